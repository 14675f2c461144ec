"""What a training loop needs around the sharded model: clipping, saving, loading, a memory report.

All of these work shard by shard. ``clip_grad_norm_``, ``full_state_dict`` and ``full_grads`` are
collectives (every rank must call them); ``load_full_state_dict`` and ``memory_report`` are local.
"""
import torch
import torch.distributed as dist

from .collectives import all_gather_bytes


def clip_grad_norm_(sharded, max_norm: float) -> torch.Tensor:
    """Scale the master gradients so their global 2-norm is at most ``max_norm``; return the norm.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: norm = sqrt(sum over all grads of g^2), scale by
    min(1, max_norm / (norm + 1e-6)). Each rank holds a disjoint slice of every flat gradient (padding
    gradients are zero), so the global sum of squares is one all-reduce of one number.
    """
    groups = [g for unit in sharded.units for g in unit.groups if g.trainable and g.master.grad is not None]
    device = groups[0].device if groups else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups:
        squares += group.master.grad.float().pow(2).sum().to(device)
    dist.all_reduce(squares, group=sharded.process_group)
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for group in groups:
        group.master.grad.mul_(scale.to(group.master.grad.device))
    return norm


def _gather(group, shard: torch.Tensor) -> torch.Tensor:
    """The whole padded flat tensor of a group, from every rank's ``shard`` (one all-gather)."""
    shard = shard.detach().to(group.device)
    full = torch.empty(group.padded_numel, dtype=shard.dtype, device=group.device)
    all_gather_bytes(full, shard, group.process_group, async_op=False)
    return full


def _gather_named(sharded, pick, trainable_only: bool) -> dict:
    """{key: tensor} on rank 0 ({} elsewhere), from ``pick(group)``: the local flat slice to gather."""
    rank = dist.get_rank(sharded.process_group)
    result = {}
    for unit in sharded.units:
        for group in unit.groups:
            if trainable_only and not group.trainable:
                continue
            full = _gather(group, pick(group))
            if rank != 0:
                continue
            for slot in group.slots:
                if slot.persistent:
                    value = full[slot.offset:slot.offset + slot.numel].view(slot.shape).to(group.dtype).cpu()
                    result.update({key: value.clone() for key in slot.keys})
    return result


def full_state_dict(sharded, trainable_only: bool = True) -> dict:
    """The model's state dict (original key names and dtypes), gathered on rank 0; {} on other ranks.

    trainable_only: only the trainable parameters (e.g. the LoRA adapters), not the frozen base.
    """
    return _gather_named(sharded, lambda g: g.master if g.trainable else g.local, trainable_only)


def full_grads(sharded) -> dict:
    """The averaged gradients of the trainable parameters by original key, gathered on rank 0."""
    return _gather_named(sharded, lambda g: g.master.grad if g.master.grad is not None
                         else torch.zeros_like(g.master), trainable_only=True)


def load_full_state_dict(sharded, state_dict: dict, strict: bool = True) -> None:
    """Copy a full state dict (the same one on every rank) into the local shards; no collective.

    Every key must name a sharded tensor. With ``strict``, every trainable tensor must be present
    (frozen ones may be left out, e.g. loading only an adapter). The next forward re-gathers.
    """
    known, trainable = set(), set()
    for unit in sharded.units:
        for group in unit.groups:
            for slot in group.slots:
                known.update(slot.keys)
                if group.trainable:
                    trainable.update(slot.keys)
    if unexpected := sorted(set(state_dict) - known):
        raise ValueError(f"state_dict: keys that are not in the sharded model: {unexpected[:5]}")
    if strict and (missing := sorted(k for k in trainable if k not in state_dict)):
        raise ValueError(f"state_dict: trainable keys missing (strict=True): {missing[:5]}")
    for unit in sharded.units:
        for group in unit.groups:
            local = group.master if group.trainable else group.local
            low, high = group.rank * group.shard_numel, (group.rank + 1) * group.shard_numel
            for slot in group.slots:
                key = next((k for k in slot.keys if k in state_dict), None)
                if key is None:
                    continue
                value = state_dict[key]
                if tuple(value.shape) != tuple(slot.shape):
                    raise ValueError(f"state_dict[{key!r}]: shape {tuple(value.shape)}, expected {tuple(slot.shape)}")
                start, stop = max(low, slot.offset), min(high, slot.offset + slot.numel)
                if start < stop:
                    with torch.no_grad():
                        local[start - low:stop - low].copy_(value.reshape(-1)[start - slot.offset:stop - slot.offset])


def memory_report(sharded, optimizer=None) -> dict:
    """Bytes held by this rank: shards (frozen + fp32 masters), gathered buffers right now, master
    gradients, optimizer state of the master shards; plus, for scale, the whole unsharded model."""
    groups = [g for unit in sharded.units for g in unit.groups]
    masters = {id(g.master) for g in groups if g.trainable}
    state = optimizer.state.items() if optimizer is not None else []
    return {
        "shards": sum(g.shard_bytes() for g in groups),
        "gathered": sum(g.gathered_bytes() for g in groups),
        "grads": sum(g.master.grad.numel() * g.master.grad.element_size()
                     for g in groups if g.trainable and g.master.grad is not None),
        "optimizer": sum(t.numel() * t.element_size() for p, s in state if id(p) in masters
                         for t in s.values() if torch.is_tensor(t)),
        "unsharded": sum(slot.numel * g.dtype.itemsize for g in groups for slot in g.slots),
    }
