"""sharding: a hand-rolled FSDP (ZeRO-3) on torch.distributed all-gather / reduce-scatter.

    import torch, sharding
    sharded = sharding.shard_model(model, units=list(model.layers))
    optimizer = torch.optim.AdamW(sharded.parameters())      # 1/world of the optimizer state
    for batch in my_slice_of_the_data:
        loss = sharded(batch)
        loss.backward()                                       # grads reduce-scattered into the shards
        sharding.clip_grad_norm_(sharded, 1.0)
        optimizer.step(); optimizer.zero_grad()
    adapter = sharding.full_state_dict(sharded)               # on rank 0

Hybrid sharding (shard within a node, replicate across nodes)::

    groups = sharding.hybrid_groups()                         # shard groups = torchrun's nodes
    sharded = sharding.shard_model(model, units, shard_group=groups.shard_group,
                                   replicate_group=groups.replicate_group)

Files, in reading order: collectives.py (all-gather / reduce-scatter / all-reduce, and a byte counter),
groups.py (plain and hybrid layouts), flat_group.py (flatten, pad, shard, gather, free, reduce), unit.py
(the hooks around one unit), offload.py (pinned arena, copy stream), model.py (shard_model), state.py
(clipping, state dicts, memory report). Shards any tensor of any dtype; knows nothing of nf4 or lora.
Set ``logging.getLogger("sharding")`` to DEBUG to see every gather, free and reduce-scatter.
"""
from .collectives import CollectiveBytes, count_collective_bytes
from .groups import HybridGroups, hybrid_groups
from .model import ShardedModel, shard_model
from .state import clip_grad_norm_, full_grads, full_state_dict, load_full_state_dict, memory_report

__all__ = ["ShardedModel", "shard_model", "hybrid_groups", "HybridGroups", "count_collective_bytes",
           "CollectiveBytes", "clip_grad_norm_", "full_grads", "full_state_dict", "load_full_state_dict",
           "memory_report"]
