"""``shard_model``: wrap a model so each unit's tensors live as 1/world shards (ZeRO-3 / FSDP).

    sharded = shard_model(model, units=list(model.layers))
    optimizer = torch.optim.AdamW(sharded.parameters())   # the local fp32 master shards only
    loss = sharded(batch); loss.backward(); optimizer.step()

After wrapping, the sharded tensors are no longer registered parameters or buffers of ``model``: they
are plain attributes that the hooks point at views of the gathered flat buffers during a unit's
forward/backward, and at meta tensors (right shape and dtype, no values) while it is freed. Use
``full_state_dict`` to read the values.

Assumptions: the model's tensors are on the compute device when wrapped (shards are cut where the
tensors are; ``offload=True`` then moves them to CPU memory); every rank runs the same units in the same
order (collectives must match); and a unit's forward is followed by its backward before that unit runs
forward again (gradient accumulation = forward + backward per micro-batch, as usual).
"""
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn

from .collectives import check_ranks_agree, log
from .flat_group import FlatGroup, lay_out
from .unit import ShardedUnit


class ShardedModel:
    """The wrapped model: call it like the model; ``parameters()`` are the trainable master shards.

    It also holds the runtime state the unit hooks share: the forward order (recorded on the first
    forward, used for prefetching, reversed for backward) and whether a backward pass is running.
    """

    def __init__(self, module, process_group, prefetch, reshard_after_forward):
        self.module, self.process_group = module, process_group
        self.rank = dist.get_rank(process_group)
        self.prefetch, self.reshard_after_forward = prefetch, reshard_after_forward
        self.units: list[ShardedUnit] = []  # root first, then the units in the order given
        self.forward_order: list[ShardedUnit] = []
        self._order_final = False
        self.in_backward = False

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self):
        """The local fp32 master shards of every trainable group: give these to the optimizer."""
        return [group.master for unit in self.units for group in unit.groups if group.trainable]

    # ------------------------------------------------------------------ runtime state for the hooks
    def record_forward(self, unit) -> None:
        if not self._order_final and unit not in self.forward_order:
            self.forward_order.append(unit)

    def finish_forward(self) -> None:
        self._order_final = True

    def next_in_forward(self, unit):
        if not self._order_final:
            return None
        position = self.forward_order.index(unit)
        return self.forward_order[position + 1] if position + 1 < len(self.forward_order) else None

    def next_in_backward(self, unit):
        if not self._order_final or unit not in self.forward_order:
            return None
        position = self.forward_order.index(unit)
        return self.forward_order[position - 1] if position > 0 else None

    def start_backward(self) -> None:
        """First pre-backward hook of a backward pass: queue the end-of-backward callback once."""
        if not self.in_backward:
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        """End of backward: free what is still gathered (units whose inputs needed no gradient, the root)."""
        log.debug("rank %d end of backward", self.rank)
        for unit in self.units:
            unit.free()
        self.in_backward = False


def _validate_units(model, units) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    units = list(units)
    inside = {id(m) for m in model.modules()}
    seen = set()
    for index, unit in enumerate(units):
        if not isinstance(unit, nn.Module):
            raise TypeError(f"units[{index}] must be an nn.Module, got {type(unit).__name__}")
        if unit is model:
            raise ValueError(f"units[{index}] is the model itself; the root is always a unit, list only submodules")
        if id(unit) not in inside:
            raise ValueError(f"units[{index}] ({type(unit).__name__}) is not a submodule of model")
        if id(unit) in seen:
            raise ValueError(f"units[{index}] ({type(unit).__name__}) is listed twice in units")
        seen.add(id(unit))
    return units


def _collect_unit(unit, prefix, unit_ids, home) -> list:
    """The tensors whose innermost unit is ``unit``: [tensor, keys, owners, trainable, persistent] each.

    The walk stops at nested units (they collect their own). ``home`` maps id(tensor) to (a weak
    reference to it, the unit that took it) over all units so far: a tensor registered in two units
    (weights tied across units) is refused. The weak reference tells a tensor still alive in an earlier
    unit from a new tensor that reuses the id of one already freed after slicing.
    """
    name = prefix.removesuffix(".") or "root"
    persistent = set(unit.state_dict(prefix=prefix, keep_vars=True))
    found = {}

    def visit(module, prefix):
        registered = [(n, t, t.requires_grad) for n, t in module.named_parameters(recurse=False)]
        registered += [(n, t, False) for n, t in module.named_buffers(recurse=False)]
        for attribute, tensor, trainable in registered:
            key = prefix + attribute
            ref, owner_unit = home.get(id(tensor), (None, name))
            if ref is not None and ref() is tensor and owner_unit != name:
                raise ValueError(f"model: tensor {key!r} is shared by two units; keep tied tensors in one unit")
            home[id(tensor)] = (weakref.ref(tensor), name)
            entry = found.setdefault(id(tensor), [tensor, [], [], trainable, False])
            if key not in entry[1]:
                entry[1].append(key)
            if (module, attribute) not in entry[2]:
                entry[2].append((module, attribute))
            entry[4] |= key in persistent
        for child_name, child in module.named_children():
            if id(child) not in unit_ids:
                visit(child, f"{prefix}{child_name}.")

    visit(unit, prefix)
    return list(found.values())


def _check_unit(name, entries, device, description):
    """Append the unit's tensors to ``description`` (for the ranks-agree check); refuse tensors still
    on ``meta`` or on another device than the units before. Returns the device."""
    for tensor, keys, _, trainable, _ in entries:
        description.append(f"{name}:{keys}:{tuple(tensor.shape)}:{tensor.dtype}:{trainable}")
        if tensor.device.type == "meta":
            raise ValueError(f"model: unit {name!r} has tensors on the meta device ({keys[0]!r}); materialize "
                             "them before shard_model, or in its materialize callback")
        if device is not None and tensor.device != device:
            raise ValueError(f"model: all tensors must be on one device, found {device} and {tensor.device} "
                             f"(unit {name!r}, {keys[0]!r})")
        device = tensor.device
    return device


def _shard_unit(sharded, unit, name, entries, **flat_options) -> ShardedUnit:
    """Flatten ``entries`` into one FlatGroup per (dtype, trainable), keep this rank's slice, unregister
    the originals. Returns with no reference to the full tensors left (the caller drops ``entries``)."""
    by_group = {}
    for entry in entries:
        by_group.setdefault((entry[0].dtype, entry[3]), []).append(entry)
    groups = []
    for (dtype, trainable), members in by_group.items():
        slots = lay_out([(tensor, keys, owners, persistent) for tensor, keys, owners, _, persistent in members])
        kind = "trainable" if trainable else "frozen"
        groups.append(FlatGroup(f"{name}[{str(dtype).replace('torch.', '')} {kind}]", [m[0] for m in members],
                                slots, trainable=trainable, **flat_options))
        for slot in slots:  # unregister: from now on the hooks set these attributes
            for owner, attribute in slot.owners:
                delattr(owner, attribute)
        groups[-1].point_module_at_placeholders()
    return ShardedUnit(name, unit, groups, sharded)


def shard_model(model, units, process_group=None, compute_dtype=None, reduce_dtype=torch.float32,
                prefetch=True, reshard_after_forward=True, offload=False, materialize=None) -> ShardedModel:
    """Shard ``model`` over the ranks of ``process_group`` (default: the default group), unit by unit.

    units: submodules (e.g. decoder layers) that are gathered and freed one at a time; the root (the
        model itself) holds every tensor not inside a unit.
    compute_dtype: dtype trainable tensors are gathered in (default: their own dtype). Frozen tensors
        are always gathered in their own dtype (uint8 codes stay uint8).
    reduce_dtype: dtype of the gradient reduce-scatter.
    prefetch: issue the next unit's all-gather asynchronously while this one computes.
    reshard_after_forward: free a unit after its forward (gather again for backward) instead of
        keeping it gathered until its backward.
    offload: keep shards (and master weights, so the optimizer step) in CPU memory.
    materialize: optional ``materialize(unit)``, called for each unit of ``units`` in order, right
        before that unit is sliced. A 70B Llama does not fit whole in one rank's CPU memory even in NF4
        (35 GB), so build it on ``meta``, materialize the root's own tensors, and let ``materialize``
        load (quantize, wrap) one unit at a time: each unit's full tensors are dropped as soon as its
        slice is kept, so loading holds about this rank's shards plus one unit.

    The ranks-agree check (one collective) runs after every unit is sliced (slicing runs none): ranks
    that built different models all raise before the first gather. After an error during the walk
    (a unit still on ``meta``, tied across units, ...) the model is half-wrapped: build it again.
    """
    units = _validate_units(model, units)
    unit_ids, home = {id(u) for u in units}, {}
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    names[id(model)] = "root"
    prefixes = {id(m): "" if m is model else names[id(m)] + "." for m in [model, *units]}
    for module in [model, *units]:  # refuse ties across units before anything changes (seen again per unit)
        _collect_unit(module, prefixes[id(module)], unit_ids, home)
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized (call init_process_group first)")
    if materialize is not None and not callable(materialize):
        raise TypeError(f"materialize must be callable or None, got {type(materialize).__name__}")
    group = process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    sharded = ShardedModel(model, group, prefetch, reshard_after_forward)
    description, device = [], None
    for module in [model, *units]:
        if materialize is not None and module is not model:
            materialize(module)
        entries = _collect_unit(module, prefixes[id(module)], unit_ids, home)
        device = _check_unit(names[id(module)], entries, device, description)
        sharded.units.append(_shard_unit(
            sharded, module, names[id(module)], entries, group=group, rank=rank, world=world,
            device=device or torch.device("cpu"), compute_dtype=compute_dtype, reduce_dtype=reduce_dtype,
            offload=offload))
        del entries  # nothing here references the unit's full tensors now: they are freed before the next
    check_ranks_agree("\n".join(description), group, device or torch.device("cpu"))
    return sharded
