"""What a training loop needs around the sharded model: clipping, saving, loading, a memory report.

All of these work shard by shard. ``clip_grad_norm_``, ``full_state_dict`` and ``full_grads`` are
collectives (every rank must call them); ``load_full_state_dict`` and ``memory_report`` are local.
Under hybrid sharding the replicas of a slice hold the same values, so these run within the shard
group only.
"""
import torch

from .collectives import all_gather_bytes, all_reduce_sum


def clip_grad_norm_(sharded, max_norm: float) -> torch.Tensor:
    """Scale the master gradients so their global 2-norm is at most ``max_norm``; return the norm.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: norm = sqrt(sum over all grads of g^2), scale by
    min(1, max_norm / (norm + 1e-6)). The ranks of a shard group hold disjoint slices of every flat
    gradient (padding gradients are zero) and the replicas of a slice hold the same averaged slice, so
    the global sum of squares is one all-reduce of one number over the shard group: each slice counted once.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    groups = [g for unit in sharded.units for g in unit.groups if g.trainable and g.master.grad is not None]
    device = groups[0].device if groups else torch.device("cpu")
    # With offload the gradients are on the host: sum there, and cross to the device and back once each
    # (a device-to-host copy makes the host wait), not once per group.
    home = groups[0].master.grad.device if groups else device
    squares = torch.zeros((), dtype=torch.float32, device=home)
    for group in groups:
        squares += group.master.grad.float().pow(2).sum().to(home)
    squares = squares.to(device)
    all_reduce_sum(squares, sharded.layout.shard_group, "shard")
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(home)
    for group in groups:
        group.master.grad.mul_(scale.to(group.master.grad.device))
    return norm


def _gather(group, shard: torch.Tensor) -> torch.Tensor:
    """The whole padded flat tensor of a group, from every rank's ``shard`` (one all-gather)."""
    shard = shard.detach().to(group.device)
    full = torch.empty(group.padded_numel, dtype=shard.dtype, device=group.device)
    all_gather_bytes(full, shard, group.layout.shard_group, async_op=False)
    return full


def _gather_named(sharded, pick, trainable_only: bool) -> dict:
    """{key: tensor} on rank 0 ({} elsewhere), from ``pick(group)``: the local flat slice to gather.
    Rank 0 is rank 0 of the first replica (every replica gathers its copy; only that one keeps it)."""
    keeps = sharded.layout.shard_rank == 0 and sharded.layout.replicate_rank == 0
    result = {}
    for unit in sharded.units:
        for group in unit.groups:
            if trainable_only and not group.trainable:
                continue
            full = _gather(group, pick(group))
            if not keeps:
                continue
            for slot in group.slots:
                if slot.persistent:
                    value = group.value_of(full, slot).cpu()
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

    Every key must name a sharded tensor, with the tensor's shape (and, for a frozen tensor, whose
    bytes are copied as they are, its dtype). With ``strict``, every trainable tensor must be present
    (frozen ones may be left out, e.g. loading only an adapter). The next forward re-gathers.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if bad := next((k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)), None):
        raise TypeError(f"state_dict[{bad!r}] must be a tensor, got {type(state_dict[bad]).__name__}")
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
                if not group.trainable and value.dtype != slot.dtype:
                    raise ValueError(f"state_dict[{key!r}]: dtype {value.dtype}, expected {slot.dtype} (frozen "
                                     "tensors are loaded byte for byte)")
                start, stop = max(low, slot.offset), min(high, slot.offset + slot.span)
                if start < stop:
                    with torch.no_grad():
                        flat = group.flat_of(value.to(local.device))
                        local[start - low:stop - low].copy_(flat[start - slot.offset:stop - slot.offset])


def memory_report(sharded, optimizer=None) -> dict:
    """Bytes held by this rank: shards (frozen + fp32 masters), gathered buffers right now, master
    gradients, optimizer state of the master shards, page-locked host memory (offload on a GPU); plus,
    for scale, the whole unsharded model."""
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
        "pinned": sharded.pinned_bytes,
        "unsharded": sum(slot.numel * slot.dtype.itemsize for g in groups for slot in g.slots),
    }
