"""Hybrid sharding (shard within a group, replicate across groups) on 4 and 8 gloo ranks, and the
collective byte counter checked against the arithmetic of the flat buffers.

World 4 runs shard sizes 4 (plain FSDP, one replica), 2 (2 replicas of 2) and 1 (DDP-like: 4 replicas
of a whole model); world 8 runs shard sizes 2 and 4. Each trains the same tiny model on its slice of
one global batch, with gradient clipping active, and must end with the parameters of one process
trained on the whole batch.
"""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sharding
from distributed import start_on_ranks
from test_sharding import VOCAB, Tiny, relative_error

STEPS, CLIP, ROWS = 3, 0.05, 24  # 24 rows split evenly over 1, 4 or 8 ranks
LAYOUTS = {4: (4, 2, 1), 8: (2, 4)}  # world size: shard sizes


def batch():
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randint(0, VOCAB, (ROWS, 5), generator=generator) for _ in range(2))


def train(sharded_or_model, parameters, tokens, targets, clip):
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = sharded_or_model(tokens, targets)
        loss.backward()
        losses.append(loss.item())
        clip()
        optimizer.step()
        optimizer.zero_grad()
    return losses


def train_hybrid(rank, world, shard_size):
    torch.manual_seed(0)
    model = Tiny()
    groups = sharding.hybrid_groups(shard_size)
    sharded = sharding.shard_model(model, list(model.layers), shard_group=groups.shard_group,
                                   replicate_group=groups.replicate_group)
    tokens, targets = (t.chunk(world)[rank] for t in batch())
    losses = train(sharded, sharded.parameters(), tokens, targets, lambda: sharding.clip_grad_norm_(sharded, CLIP))
    memory = sharding.memory_report(sharded)
    return {"state": sharding.full_state_dict(sharded), "losses": losses,
            "shards": memory["shards"], "unsharded": memory["unsharded"]}


def train_whole_batch():
    torch.manual_seed(0)
    model = Tiny()
    losses = train(model, model.parameters(), *batch(),
                   lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    return {k: v for k, v in model.state_dict().items() if not k.endswith("scale")}, losses


class FrozenEmbedding(nn.Module):
    """Tiny with its embedding a unit of its own and frozen: fed token ids, it has no backward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8).bfloat16().requires_grad_(False)  # bf16, as the compute dtype
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, VOCAB, bias=False)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for layer in self.layers:
            x = F.silu(layer(x))
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def counted_step(rank, world):
    """Collective bytes of one training step (the second: prefetch on) with shard size 2, and every
    gather the sharding logger reports."""
    model = FrozenEmbedding()
    groups = sharding.hybrid_groups(2)
    sharded = sharding.shard_model(model, [model.embed, *model.layers], shard_group=groups.shard_group,
                                   replicate_group=groups.replicate_group, compute_dtype=torch.bfloat16)
    tokens, targets = (t.chunk(world)[rank] for t in batch())
    sharded(tokens, targets).backward()  # the first step records the forward order
    messages, handler, logger = [], logging.Handler(), logging.getLogger("sharding")
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler), logger.setLevel(logging.DEBUG)
    with sharding.count_collective_bytes() as counted:
        sharded(tokens, targets).backward()
        sharding.clip_grad_norm_(sharded, 1.0)
    logger.removeHandler(handler), logger.setLevel(logging.WARNING)
    units = {unit.name: [(g.trainable, g.padded_numel, g.shard_numel, g.gather_dtype.itemsize) for g in unit.groups]
             for unit in sharded.units}
    return {"bytes": dict(counted.bytes), "calls": dict(counted.calls), "units": units,
            "gathers": [m.split(" gather ")[1] for m in messages if " gather " in m]}


def job(rank, world):
    out = {shard_size: train_hybrid(rank, world, shard_size) for shard_size in LAYOUTS[world]}
    out["counted"] = counted_step(rank, world) if world == 4 else None
    out["bad_layouts"] = bad_layouts(rank, world) if world == 4 else None
    out["reference"], out["reference_losses"] = train_whole_batch() if rank == 0 else (None, None)
    return out


_jobs = {}


@pytest.fixture(scope="module", params=sorted(LAYOUTS), ids=lambda w: f"world{w}")
def ranks(request):
    if not _jobs:
        _jobs.update({world: start_on_ranks(job, world, timeout_s=300) for world in LAYOUTS})
    world = request.param
    if not isinstance(_jobs[world], list):
        _jobs[world] = _jobs[world].results()
    return world, _jobs[world]


def test_hybrid_layouts_train_like_one_process_on_the_whole_batch(ranks):
    world, results = ranks
    reference = results[0]["reference"]
    for shard_size in LAYOUTS[world]:
        ours = results[0][shard_size]["state"]
        assert ours.keys() == reference.keys()
        errors = {k: relative_error(ours[k], reference[k]) for k in ours}
        assert max(errors.values()) <= 1e-5, (shard_size, errors)
        # the whole batch's loss is the mean of the ranks' (equal slices); the state comes back on rank 0 only
        mean = torch.tensor([r[shard_size]["losses"] for r in results]).double().mean(0)
        torch.testing.assert_close(mean, torch.tensor(results[0]["reference_losses"]).double(), rtol=1e-5, atol=0)
        assert all(r[shard_size]["state"] == {} for r in results[1:])


def test_each_rank_holds_one_over_shard_size_of_the_model(ranks):
    world, results = ranks
    for shard_size in LAYOUTS[world]:
        for result in results:
            shards, unsharded = result[shard_size]["shards"], result[shard_size]["unsharded"]
            # fp32 masters, plus padding (< shard_size elements per group; 8 groups of at most 4 bytes each)
            assert unsharded / shard_size <= shards <= unsharded / shard_size + 8 * 4 * shard_size


@pytest.mark.parametrize("ranks", [4], indirect=True, ids=lambda w: f"world{w}")
def test_counted_collective_bytes_match_the_arithmetic(ranks):
    """Forward gathers every unit; backward gathers the layers again (the root stays gathered, the
    frozen embedding has no backward); each trainable group is reduce-scattered in fp32 over the shard
    group, then its slice all-reduced over the replicas; clipping all-reduces one fp32 number."""
    world, results = ranks
    for result in results:
        counted, units = result["counted"], result["counted"]["units"]
        every = [g for groups in units.values() for g in groups]
        layers = [g for name, groups in units.items() if name.startswith("layers.") for g in groups]
        trainable = [g for g in every if g[0]]
        gathered = every + layers
        assert counted["bytes"][("shard", "all_gather")] == sum(padded * size for _, padded, _, size in gathered)
        assert counted["calls"][("shard", "all_gather")] == len(gathered)
        assert counted["bytes"][("shard", "reduce_scatter")] == sum(4 * padded for _, padded, _, _ in trainable)
        assert counted["bytes"][("replicate", "all_reduce")] == sum(4 * shard for _, _, shard, _ in trainable)
        assert counted["calls"][("replicate", "all_reduce")] == len(trainable)
        assert counted["bytes"][("shard", "all_reduce")] == 4 and counted["calls"][("shard", "all_reduce")] == 1
        assert set(counted["bytes"]) == {("shard", "all_gather"), ("shard", "reduce_scatter"),
                                         ("replicate", "all_reduce"), ("shard", "all_reduce")}


@pytest.mark.parametrize("ranks", [4], indirect=True, ids=lambda w: f"world{w}")
def test_a_frozen_embedding_fed_token_ids_is_gathered_once_per_step(ranks):
    """Its backward never runs: no gather, and no prefetch, for backward. Every other unit is gathered
    once per phase (a frozen-bytes group and a trainable group each: one all-gather per group)."""
    world, results = ranks
    for result in results:
        gathers = result["counted"]["gathers"]
        assert [g for g in gathers if g.startswith("embed")] == [  # 11 x 8 bf16, in the forward prefetch only
            f"embed[frozen] ({VOCAB * 8 * 2} bytes) (prefetch for forward)"]
        for layer in ("layers.0", "layers.1"):
            assert sum(g.startswith(layer) for g in gathers) == 2  # forward + backward, one group (trainable)


def bad_layouts(rank, world):
    """Group arguments that cannot work, each refused on every rank with a message naming the argument."""
    import torch.distributed as dist

    pair = sharding.hybrid_groups(2)
    first_two = dist.new_group([0, 1])  # every rank creates it; ranks 2 and 3 are not members
    cases = {
        "product": lambda: dict(shard_group=None, replicate_group=pair.shard_group),  # 4 x 2 ranks != 4
        "not_a_grid": lambda: dict(shard_group=pair.shard_group, replicate_group=pair.shard_group),
        "not_a_member": lambda: dict(process_group=first_two) if rank >= 2 else None,
        "both_spellings": lambda: dict(process_group=pair.shard_group, shard_group=pair.shard_group),
    }
    errors = {}
    for name, options in cases.items():
        model = Tiny()
        if (options := options()) is None:
            continue
        try:
            sharding.shard_model(model, list(model.layers), **options)
        except (ValueError, TypeError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    try:
        sharding.hybrid_groups(3)
    except ValueError as error:
        errors["shard_size"] = str(error)
    return errors


@pytest.mark.parametrize("ranks", [4], indirect=True, ids=lambda w: f"world{w}")
def test_groups_that_do_not_form_a_grid_are_refused_on_every_rank(ranks):
    world, results = ranks
    for rank, result in enumerate(results):
        errors = result["bad_layouts"]
        assert "must cover the 4 ranks of the default group" in errors["product"]
        assert "not a grid" in errors["not_a_grid"]
        assert ("not_a_member" in errors) == (rank >= 2)  # ranks 0 and 1 shard over their pair
        assert rank < 2 or f"this rank ({rank}) is not a member of the group" in errors["not_a_member"]
        assert "pass process_group alone" in errors["both_spellings"]
        assert "shard_size must be a positive int dividing the world size 4, got 3" in errors["shard_size"]
