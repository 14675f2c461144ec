"""Where a rank sits: plain FSDP (one flat group), or hybrid sharding (shard within, replicate across).

Hybrid sharding (PyTorch FSDP2 on a 2-D device mesh; ``HYBRID_SHARD`` in FSDP1) arranges the ranks
in a grid of ``replicas x shard_size``. Each row is a *shard group*: its ranks hold 1/shard_size of every
unit and all-gather it, as plain FSDP does, over the fast links inside a node. Each column is a
*replicate group*: ranks that hold the same slice. A gradient is reduce-scattered within the shard
group, then the slice is all-reduced across the replicate group (once per step and slice: 1/shard_size
of the bytes of DDP's all-reduce cross the slow links). With 4 ranks on 2 nodes (torchrun's layout:
consecutive ranks share a node)::

    shard groups      {0, 1}  {2, 3}        (node 0, node 1)
    replicate groups  {0, 2}  {1, 3}        (same slice on each node)

Plain FSDP is one shard group and replicas of size 1; DDP-like replication is shard groups of size 1.
"""
import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """This rank's place in the 2-D layout; ``None`` groups mean the default group (shard) or no
    replication (replicate)."""

    shard_group: object
    shard_rank: int
    shard_size: int
    replicate_group: object = None
    replicate_rank: int = 0
    replicate_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        """Ranks that each see their own slice of the batch: gradients are averaged over all of them."""
        return self.shard_size * self.replicate_size


@dataclass(frozen=True)
class HybridGroups:
    """The groups ``hybrid_groups`` made for this rank; pass them to ``shard_model``."""

    shard_group: object
    replicate_group: object


def hybrid_groups(shard_size: int | None = None) -> HybridGroups:
    """Build the shard and replicate groups of the default group, ``shard_size`` consecutive ranks per
    shard group (default: torchrun's ``LOCAL_WORLD_SIZE``, the processes on one node).

    A collective over all ranks: every rank must call it, with the same ``shard_size``.
    """
    if not dist.is_initialized():
        raise ValueError("hybrid_groups: torch.distributed is not initialized (call init_process_group first)")
    if shard_size is None:
        if "LOCAL_WORLD_SIZE" not in os.environ:
            raise ValueError("shard_size: not given and LOCAL_WORLD_SIZE is not set (launch with torchrun, "
                             "or pass the number of ranks per shard group)")
        shard_size = int(os.environ["LOCAL_WORLD_SIZE"])
    world = dist.get_world_size()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1 or world % shard_size:
        raise ValueError(f"shard_size must be a positive int dividing the world size {world}, got {shard_size!r}")
    rank, replicas = dist.get_rank(), world // shard_size
    mine = {}
    # new_group is itself collective: every rank creates every group, in the same order, and keeps its own
    for row in range(replicas):
        ranks = list(range(row * shard_size, (row + 1) * shard_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["shard"] = group
    for column in range(shard_size):
        ranks = list(range(column, world, shard_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["replicate"] = group
    return HybridGroups(mine["shard"], mine["replicate"])


def _size_and_rank(name: str, group) -> tuple[int, int]:
    try:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
    except (RuntimeError, ValueError, AttributeError, TypeError) as error:
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {group!r} ({error})") from None
    if rank < 0:
        raise ValueError(f"{name}: this rank ({dist.get_rank()}) is not a member of the group")
    return size, rank


def resolve_layout(process_group, shard_group, replicate_group) -> Layout:
    """Check the groups passed to ``shard_model`` and return this rank's Layout."""
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized (call init_process_group first)")
    if process_group is not None and (shard_group is not None or replicate_group is not None):
        raise ValueError("process_group is the plain-FSDP spelling of shard_group: pass process_group alone, "
                         "or shard_group (and replicate_group), not both")
    shard_group = process_group if process_group is not None else shard_group
    shard_size, shard_rank = _size_and_rank("shard_group", shard_group)
    if replicate_group is None:
        return Layout(shard_group, shard_rank, shard_size)
    replicate_size, replicate_rank = _size_and_rank("replicate_group", replicate_group)
    world = dist.get_world_size()
    if shard_size * replicate_size != world:
        raise ValueError(f"shard_group ({shard_size} ranks) x replicate_group ({replicate_size} ranks) must cover "
                         f"the {world} ranks of the default group once each (shard size x replicas = world)")
    return Layout(shard_group, shard_rank, shard_size, replicate_group, replicate_rank, replicate_size)
