"""recipe.instruct.loss: token-weighted loss gives the same gradient however the global batch is split,
across micro-batches (grad-accum 4 x batch 1 == batch 4) and across ranks with different target counts."""
import pytest
import torch
import torch.distributed as dist

from distributed import start_on_ranks
from recipe.instruct.batching import batches
from recipe.instruct.loss import count_targets, global_target_count, scaled_loss, token_losses
from test_instruct_batching import random_examples, tiny_llama

LENGTHS = [9, 20, 5, 31, 12, 17]  # random prompt lengths too: every split holds a different target count


def step_gradient(micro_batches, world_size=1):
    """One step's gradient, flattened: scaled loss per micro-batch, then averaged over ranks (as FSDP/DDP)."""
    model = tiny_llama().train()
    total = global_target_count([batch.labels for batch in micro_batches])
    for batch in micro_batches:
        logits = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        scaled_loss(logits, batch.labels, total, world_size).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    if world_size > 1:
        dist.all_reduce(grad)
        grad /= world_size
    return grad


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def _rank_gradient(rank, world_size):
    examples = random_examples(LENGTHS)
    share = len(LENGTHS) // world_size
    mine = examples[rank * share:(rank + 1) * share]
    micro = batches(mine, batch_size=1, seq_len=32, packing=False)
    return step_gradient(micro, world_size), sum(count_targets(b.labels) for b in micro)


def test_grad_accum_4_by_batch_1_equals_batch_4():
    examples = random_examples(LENGTHS[:4])
    whole = step_gradient(batches(examples, batch_size=4, seq_len=32, packing=False))
    accumulated = step_gradient(batches(examples, batch_size=1, seq_len=32, packing=False))
    assert relative_error(accumulated, whole) < 1e-6
    mean_of_means = tiny_llama()  # the plain per-micro-batch mean would weigh them wrongly: it must differ
    for batch in batches(examples, batch_size=1, seq_len=32, packing=False):
        losses = token_losses(mean_of_means(batch.input_ids), batch.labels)
        (losses.sum() / count_targets(batch.labels) / 4).backward()
    naive = torch.cat([p.grad.flatten() for p in mean_of_means.parameters()])
    assert relative_error(naive, whole) > 1e-2


@pytest.mark.slow
def test_ranks_with_different_target_counts_take_the_step_of_one_rank():
    jobs = {world_size: start_on_ranks(_rank_gradient, world_size) for world_size in (2, 3)}  # both at once
    whole = step_gradient(batches(random_examples(LENGTHS), batch_size=len(LENGTHS), seq_len=32, packing=True))
    for world_size, job in jobs.items():
        results = job.results()
        assert len({count for _, count in results}) == world_size  # the ranks' target counts all differ
        for grad, _ in results:
            assert relative_error(grad, whole) < 1e-6, world_size


def test_no_target_at_all_is_an_error():
    from recipe.instruct.batching import collate
    from recipe.instruct.encode import Encoded

    batch = collate([[Encoded([1, 2, 3], [False, False, False])]])
    with pytest.raises(ValueError, match="no target tokens"):
        global_target_count([batch.labels])
    with pytest.raises(ValueError, match="global_targets must be >= 1, got 0"):
        scaled_loss(torch.zeros(1, 3, 5), batch.labels, 0)
