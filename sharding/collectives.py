"""The collectives a sharded data-parallel step needs, a byte counter around them, and the wrap-time checks.

ZeRO-3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", Sec. 5.3) moves parameters with an *all-gather* (every rank contributes its 1/world slice and
receives the whole tensor) and gradients with a *reduce-scatter* (every rank contributes a whole
gradient and receives the sum of one 1/world slice). Together they cost the same bytes as the
all-reduce of plain data parallelism (an all-reduce *is* a reduce-scatter followed by an all-gather).
Hybrid sharding adds one *all-reduce* of each gradient slice across the replicate group.

Every collective of a step goes through the three functions below, which report to
``count_collective_bytes``. Newer torch renamed the two "one flat tensor" collectives
(``all_gather_into_tensor`` -> ``all_gather_single``, ``reduce_scatter_tensor`` ->
``reduce_scatter_single``) and warns on the old names, so we look each one up once here.
"""
import contextlib
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger("sharding")
"""Set to DEBUG to print every gather / free / reduce-scatter (the chapter's hook-by-hook trace)."""

_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CollectiveBytes:
    """What ``count_collective_bytes`` saw on this rank, keyed by (group, collective).

    group: "shard" (the ranks that share one model's slices: intra-node under hybrid sharding) or
    "replicate" (the ranks holding the same slice: inter-node). collective: "all_gather",
    "reduce_scatter" or "all_reduce". Bytes are those of the collective's whole buffer on this rank: the
    all-gather's output, the reduce-scatter's input, the all-reduce's tensor. A ring implementation
    sends (n - 1) / n of that per rank for an all-gather or a reduce-scatter over n ranks, and twice
    that for an all-reduce.
    """

    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def total(self, group: str | None = None, collective: str | None = None) -> int:
        """Bytes summed over every key matching ``group`` and ``collective`` (None matches all)."""
        return sum(n for (g, c), n in self.bytes.items() if group in (None, g) and collective in (None, c))


_counters: list[CollectiveBytes] = []  # a plain list, not a contextvar: autograd may run hooks on its own thread


@contextlib.contextmanager
def count_collective_bytes():
    """Count the bytes and calls of every sharding collective issued inside the block (on this rank).

        with sharding.count_collective_bytes() as counted:
            loss = sharded(batch); loss.backward()
        counted.total("replicate")      # bytes all-reduced across replicas
    """
    counted = CollectiveBytes()
    _counters.append(counted)
    try:
        yield counted
    finally:
        _counters.remove(counted)


def _count(group: str, collective: str, tensor: torch.Tensor) -> None:
    for counted in _counters:
        counted.bytes[group, collective] += tensor.numel() * tensor.element_size()
        counted.calls[group, collective] += 1


def all_gather_bytes(full: torch.Tensor, shard: torch.Tensor, group, async_op: bool):
    """All-gather ``shard`` from every rank of the shard group into ``full`` (rank r's slice at
    r * shard.numel()).

    An all-gather only copies, so we ship raw bytes: any dtype (uint8 NF4 codes, bf16 norms, fp32
    absmax) goes through any backend unchanged and bit-exact.
    """
    _count("shard", "all_gather", full)
    return _all_gather_flat(full.view(torch.uint8), shard.view(torch.uint8), group=group, async_op=async_op)


def reduce_scatter_sum(mine: torch.Tensor, full: torch.Tensor, group):
    """Start summing ``full`` over the shard group, this rank's slice into ``mine``; returns the work to
    ``wait()`` on. The caller may drop ``full`` as soon as this returns: the backend keeps what it still
    needs (gloo sums a copy it takes here; NCCL keeps the input alive until the collective is done)."""
    _count("shard", "reduce_scatter", full)
    return _reduce_scatter_flat(mine, full, group=group, async_op=True)


def all_reduce_sum(tensor: torch.Tensor, group, role: str) -> None:
    """Sum ``tensor`` in place over ``group`` ("shard" or "replicate", for the counter)."""
    _count(role, "all_reduce", tensor)
    dist.all_reduce(tensor, group=group)


def _gather_values(value: int, group, device) -> list[int]:
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    everyone = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    _all_gather_flat(everyone, mine, group=group)
    return everyone.tolist()


def check_ranks_agree(description: str, group, device: torch.device) -> None:
    """Raise ValueError on *every* rank of ``group`` if its ranks built different models (one all-gather).

    Without this check, ranks whose flat buffers differ in size would call all-gathers of different
    sizes and hang (or crash gloo) at the first forward. ``description`` lists every sharded tensor's
    name, shape, dtype and trainability; we compare 8-byte fingerprints of it.
    """
    fingerprint = int.from_bytes(hashlib.sha256(description.encode()).digest()[:8], "little", signed=True)
    everyone = _gather_values(fingerprint, group, device)
    if len(set(everyone)) != 1:
        groups = {}
        for rank, value in enumerate(everyone):
            groups.setdefault(value, []).append(rank)
        raise ValueError(
            "model: the ranks of the process group built different models (tensor names, shapes, dtypes "
            f"or requires_grad differ); ranks grouped by identical models: {sorted(groups.values())}"
        )


def check_layout(layout, device: torch.device) -> None:
    """Raise ValueError on every rank unless the replicas of a slice all hold the same slice number and
    the members of a shard group all sit in the same replica (three collectives of one number)."""
    slices = _gather_values(layout.shard_rank, layout.replicate_group, device)
    replicas = _gather_values(layout.replicate_rank, layout.shard_group, device)
    broken = torch.tensor([len(set(slices)) != 1 or len(set(replicas)) != 1], dtype=torch.int64, device=device)
    dist.all_reduce(broken, op=dist.ReduceOp.MAX)  # so that every rank raises, not only the ones that see it
    if broken.item():
        raise ValueError(
            "shard_group / replicate_group: not a grid. Each replicate group must join the ranks that hold "
            f"the same slice (this rank's replicate group holds slices {slices}) and each shard group must lie "
            f"in one replica (this rank's shard group spans replica positions {replicas}); see hybrid_groups")
