"""recipe.instruct.batching: a packed row (block-diagonal causal mask, positions restarting) gives every
example exactly the token losses it gets alone, and so does a padded batch."""
import pytest
import torch

import llama
from recipe.instruct.batching import batches, collate, fit_length, pack
from recipe.instruct.encode import Encoded
from recipe.instruct.loss import token_losses


def tiny_llama():
    torch.manual_seed(0)
    config = llama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=258, bos_token_id=256, eos_token_id=257)
    return llama.Llama(config).float().eval()


def random_examples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=generator).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=generator))
        examples.append(Encoded([256, *ids[1:]], [False] * prompt + [True] * (n - prompt)))
    return examples


def losses_alone(model, examples):
    """Each example's target-token losses, the example run on its own (no mask, positions 0..n-1)."""
    out = []
    for example in examples:
        batch = collate([[example]])
        with torch.no_grad():
            losses = token_losses(model(batch.input_ids), batch.labels)
        out.append(losses[batch.labels[:, 1:] != -100])
    return torch.cat(out)


def batch_losses(model, batch_list):
    out = []
    for batch in batch_list:
        with torch.no_grad():
            logits = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        out.append(token_losses(logits, batch.labels)[batch.labels[:, 1:] != -100])
    return torch.cat(out)


def test_a_packed_row_gives_each_example_exactly_its_loss_alone():
    model, examples = tiny_llama(), random_examples([9, 20, 5, 31, 12, 7])
    packed = batches(examples, batch_size=2, seq_len=48, packing=True)
    assert len(packed) == 1 and packed[0].input_ids.shape == (2, 48)  # 84 tokens in 2 rows of 48
    rows = pack(examples, 48)
    assert [[len(e) for e in row] for row in rows] == [[9, 20, 5, 12], [31, 7]]
    order = [e for row in rows for e in row]  # the packed batch lists targets row by row
    torch.testing.assert_close(batch_losses(model, packed), losses_alone(model, order), rtol=0, atol=1e-5)
    assert packed[0].position_ids[0, 9].item() == 0 and packed[0].labels[0, 9].item() == -100  # 2nd example


def test_padded_batches_give_each_example_exactly_its_loss_alone():
    model, examples = tiny_llama(), random_examples([9, 20, 5, 31, 12])
    padded = batches(examples, batch_size=2, seq_len=40, packing=False)
    assert [b.input_ids.shape for b in padded] == [(2, 20), (2, 31), (1, 12)]
    torch.testing.assert_close(batch_losses(model, padded), losses_alone(model, examples), rtol=0, atol=1e-5)


def test_first_fit_and_labels():
    a, b, c = Encoded([1, 2, 3], [False, True, True]), Encoded([4, 5], [True, True]), Encoded([6] * 4, [True] * 4)
    assert pack([c, a, b], 5) == [[c], [a, b]]
    batch = collate([[a, b]], length=6, pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 9]]
    assert batch.labels.tolist() == [[-100, 2, 3, -100, 5, -100]]  # prompt, boundary, padding unscored
    assert batch.position_ids[0, :5].tolist() == [0, 1, 2, 0, 1]
    mask = batch.attention_mask[0]
    assert mask[4].tolist() == [False, False, False, True, True, False] and mask[5].tolist() == [False] * 5 + [True]
    with pytest.raises(ValueError, match="does not fit seq_len=2"):
        pack([a], 2)


def test_long_examples_are_truncated_or_dropped_and_counted():
    long, short = Encoded(list(range(10)), [False] * 4 + [True] * 6), Encoded([1, 2], [False, True])
    prompt_only = Encoded(list(range(8)), [False] * 6 + [True] * 2)  # its targets fall past seq_len
    kept, counts = fit_length([long, short, prompt_only], seq_len=6)
    assert [len(e) for e in kept] == [6, 2] and counts == {"truncated": 2, "dropped": 1}
    kept, counts = fit_length([long, short, prompt_only], seq_len=6, drop_long=True)
    assert kept == [short] and counts == {"truncated": 0, "dropped": 2}
    with pytest.raises(ValueError, match="seq_len must be >= 2, got 1"):
        fit_length([short], 1)
