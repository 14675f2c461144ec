"""The three collectives a sharded data-parallel step needs, plus the wrap-time agreement check.

ZeRO-3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", Sec. 5.3) moves parameters with an *all-gather* (every rank contributes its 1/world slice and
receives the whole tensor) and gradients with a *reduce-scatter* (every rank contributes a whole
gradient and receives the sum of one 1/world slice). Together they cost the same bytes as the
all-reduce of plain data parallelism (an all-reduce *is* a reduce-scatter followed by an all-gather).

Newer torch renamed the two "one flat tensor" collectives (``all_gather_into_tensor`` ->
``all_gather_single``, ``reduce_scatter_tensor`` -> ``reduce_scatter_single``) and warns on the old
names, so we look each one up once here.
"""
import hashlib
import logging

import torch
import torch.distributed as dist

log = logging.getLogger("sharding")
"""Set to DEBUG to print every gather / free / reduce-scatter (the chapter's hook-by-hook trace)."""

all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_bytes(full: torch.Tensor, shard: torch.Tensor, group, async_op: bool):
    """All-gather ``shard`` from every rank into ``full`` (rank r's slice at r * shard.numel()).

    An all-gather only copies, so we ship raw bytes: any dtype (uint8 NF4 codes, bf16 norms, fp32
    absmax) goes through any backend unchanged and bit-exact.
    """
    return all_gather_flat(full.view(torch.uint8), shard.view(torch.uint8), group=group, async_op=async_op)


def check_ranks_agree(description: str, group, device: torch.device) -> None:
    """Raise ValueError on *every* rank if the ranks built different models (one all-gather).

    Without this check, ranks whose flat buffers differ in size would call all-gathers of different
    sizes and hang (or crash gloo) at the first forward. ``description`` lists every sharded tensor's
    name, shape, dtype and trainability; we compare 8-byte fingerprints of it.
    """
    world = dist.get_world_size(group)
    fingerprint = int.from_bytes(hashlib.sha256(description.encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([fingerprint], dtype=torch.int64, device=device)
    everyone = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_flat(everyone, mine, group=group)
    if len(set(everyone.tolist())) != 1:
        groups = {}
        for rank, value in enumerate(everyone.tolist()):
            groups.setdefault(value, []).append(rank)
        raise ValueError(
            "model: the ranks of the process group built different models (tensor names, shapes, dtypes "
            f"or requires_grad differ); ranks grouped by identical models: {sorted(groups.values())}"
        )
