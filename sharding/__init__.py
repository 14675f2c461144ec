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

Files, in reading order: collectives.py (all-gather / reduce-scatter), flat_group.py (flatten, pad,
shard, gather, free, reduce), unit.py (the hooks around one unit), model.py (shard_model), state.py
(clipping, state dicts, memory report). Shards any tensor of any dtype; knows nothing of nf4 or lora.
Set ``logging.getLogger("sharding")`` to DEBUG to see every gather, free and reduce-scatter.
"""
from .model import ShardedModel, shard_model
from .state import clip_grad_norm_, full_grads, full_state_dict, load_full_state_dict, memory_report

__all__ = ["ShardedModel", "shard_model", "clip_grad_norm_", "full_grads", "full_state_dict",
           "load_full_state_dict", "memory_report"]
