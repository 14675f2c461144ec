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
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .collectives import check_layout, check_ranks_agree, log
from .flat_group import FlatGroup, lay_out
from .groups import resolve_layout
from .offload import HostOffload
from .unit import ShardedUnit

_sharded_modules = weakref.WeakSet()  # every module shard_model has taken tensors from (to refuse a second pass)


class ShardedModel:
    """The wrapped model: call it like the model; ``parameters()`` are the trainable master shards.

    It also holds the runtime state the unit hooks share: the forward order (recorded on the first
    forward, used for prefetching, reversed for backward) and whether a backward pass is running.
    """

    def __init__(self, module, layout, prefetch, reshard_after_forward, offload):
        self.module, self.layout, self.offload = module, layout, offload
        self.rank = layout.shard_rank
        self.prefetch, self.reshard_after_forward = prefetch, reshard_after_forward
        self.units: list[ShardedUnit] = []  # root first, then the units in the order given
        self.forward_order: list[ShardedUnit] = []
        self._order_final = False
        self.in_backward = False

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def process_group(self):
        """The shard group (the only group under plain FSDP)."""
        return self.layout.shard_group

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host bytes of the offload arena (0 without offload or without a GPU)."""
        return self.offload.pinned_bytes if self.offload is not None else 0

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
        """The nearest unit before ``unit`` in forward whose backward will run (None if there is none)."""
        if not self._order_final or unit not in self.forward_order:
            return None
        earlier = self.forward_order[:self.forward_order.index(unit)]
        return next((u for u in reversed(earlier) if u.has_backward), None)

    def start_backward(self) -> None:
        """First pre-backward hook of a backward pass: queue the end-of-backward callback once."""
        if not self.in_backward:
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        """End of backward: free what is still gathered (units whose inputs needed no gradient, the root)
        and, with offload, wait for the gradients' device-to-host copies."""
        log.debug("rank %d end of backward", self.rank)
        for unit in self.units:
            unit.free()
        if self.offload is not None:
            self.offload.finish()
        self.in_backward = False


@dataclass
class Member:
    """One tensor of a unit, found by the walk: every name and (module, attribute) that holds it."""

    tensor: torch.Tensor
    trainable: bool
    keys: list[str] = field(default_factory=list)
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    persistent: bool = False  # in the state dict (False for non-persistent buffers)


def _validate_units(model, units) -> list:
    if isinstance(model, ShardedModel):
        raise TypeError("model is already a ShardedModel: shard_model takes the plain nn.Module, once")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if already := next((name or "the model" for name, m in model.named_modules() if m in _sharded_modules), None):
        raise ValueError(f"model: {already} was already sharded by shard_model (its tensors live in a ShardedModel "
                         "now); shard a freshly built model")
    try:
        units = list(units)
    except TypeError:
        raise TypeError(f"units must be an iterable of submodules, got {type(units).__name__}") from None
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


def _validate_options(compute_dtype, reduce_dtype, flags: dict, materialize) -> None:
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"compute_dtype must be None or a floating torch.dtype, got {compute_dtype!r}")
    if not (isinstance(reduce_dtype, torch.dtype) and reduce_dtype.is_floating_point):
        raise TypeError(f"reduce_dtype must be a floating torch.dtype, got {reduce_dtype!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if materialize is not None and not callable(materialize):
        raise TypeError(f"materialize must be callable or None, got {type(materialize).__name__}")


def _collect_unit(unit, prefix, unit_ids, home) -> list[Member]:
    """The tensors whose innermost unit is ``unit``, one Member each.

    The walk stops at nested units (they collect their own). ``home`` maps id(tensor) to (a weak
    reference to it, the unit that took it) over all units so far: a tensor registered in two units
    (weights tied across units) is refused. The weak reference tells a tensor still alive in an earlier
    unit from a new tensor that reuses the id of one already freed after slicing.

    The walk is a loop over an explicit stack, not a recursive inner function: such a function refers to
    itself through its closure, a reference cycle that would keep every Member (and so the unit's full,
    unsharded tensors) alive until Python's cycle collector happens to run, long after slicing.
    """
    name = prefix.removesuffix(".") or "root"
    persistent = set(unit.state_dict(prefix=prefix, keep_vars=True))
    found: dict[int, Member] = {}
    stack = [(unit, prefix)]
    while stack:
        module, prefix = stack.pop()
        registered = [(n, t, t.requires_grad) for n, t in module.named_parameters(recurse=False)]
        registered += [(n, t, False) for n, t in module.named_buffers(recurse=False)]
        for attribute, tensor, trainable in registered:
            key = prefix + attribute
            ref, owner_unit = home.get(id(tensor), (None, name))
            if ref is not None and ref() is tensor and owner_unit != name:
                raise ValueError(f"model: tensor {key!r} is shared by two units; keep tied tensors in one unit")
            home[id(tensor)] = (weakref.ref(tensor), name)
            member = found.setdefault(id(tensor), Member(tensor, trainable))
            if key not in member.keys:
                member.keys.append(key)
            if (module, attribute) not in member.owners:
                member.owners.append((module, attribute))
            member.persistent |= key in persistent
        children = [(c, f"{prefix}{n}.") for n, c in module.named_children() if id(c) not in unit_ids]
        stack.extend(reversed(children))  # popped in definition order: the same order as a recursive walk
    return list(found.values())


def _check_unit(name, members, device, description):
    """Append the unit's tensors to ``description`` (for the ranks-agree check); refuse tensors still
    on ``meta`` or on another device than the units before. Returns the device."""
    for member in members:
        tensor, key = member.tensor, member.keys[0]
        description.append(f"{name}:{member.keys}:{tuple(tensor.shape)}:{tensor.dtype}:{member.trainable}")
        if tensor.device.type == "meta":
            raise ValueError(f"model: unit {name!r} has tensors on the meta device ({key!r}); materialize "
                             "them before shard_model, or in its materialize callback")
        if device is not None and tensor.device != device:
            raise ValueError(f"model: all tensors must be on one device, found {device} and {tensor.device} "
                             f"(unit {name!r}, {key!r})")
        device = tensor.device
    return device


def _shard_unit(sharded, unit, name, members, **flat_options) -> ShardedUnit:
    """Flatten ``members`` into one FlatGroup of frozen bytes and one per trainable dtype, keep this rank's
    slice, unregister the originals. Returns with no reference to the full tensors left."""
    by_group = {}
    for member in members:
        by_group.setdefault(member.tensor.dtype if member.trainable else None, []).append(member)
    groups = []
    for dtype, group_members in by_group.items():
        trainable = dtype is not None
        slots = lay_out(group_members, dtype if trainable else torch.uint8)
        label = f"{str(dtype).replace('torch.', '')} trainable" if trainable else "frozen"
        groups.append(FlatGroup(f"{name}[{label}]", [m.tensor for m in group_members], slots,
                                trainable=trainable, **flat_options))
        for slot in slots:  # unregister: from now on the hooks set these attributes
            for owner, attribute in slot.owners:
                delattr(owner, attribute)
        groups[-1].point_module_at_placeholders()
    _sharded_modules.add(unit)
    return ShardedUnit(name, unit, groups, sharded)


def shard_model(model, units, process_group=None, compute_dtype=None, reduce_dtype=torch.float32,
                prefetch=True, reshard_after_forward=True, offload=False, materialize=None, *,
                shard_group=None, replicate_group=None) -> ShardedModel:
    """Shard ``model`` over the ranks of ``process_group`` (default: the default group), unit by unit.

    units: submodules (e.g. decoder layers) that are gathered and freed one at a time; the root (the
        model itself) holds every tensor not inside a unit.
    compute_dtype: dtype trainable tensors are gathered in (default: their own dtype). Frozen tensors
        are always gathered as their own bytes (uint8 codes stay uint8).
    reduce_dtype: dtype of the gradient reduce-scatter (and of the replicas' all-reduce).
    prefetch: issue the next unit's all-gather asynchronously while this one computes.
    reshard_after_forward: free a unit after its forward (gather again for backward) instead of
        keeping it gathered until its backward.
    offload: keep shards (and master weights, so the optimizer step) in CPU memory, in one pinned arena
        (see offload.py; ``ShardedModel.pinned_bytes`` says how big).
    materialize: optional ``materialize(unit)``, called for each unit of ``units`` in order, right
        before that unit is sliced. A 70B Llama does not fit whole in one rank's CPU memory even in NF4
        (35 GB), so build it on ``meta``, materialize the root's own tensors, and let ``materialize``
        load (quantize, wrap) one unit at a time: each unit's full tensors are dropped as soon as its
        slice is kept, so loading holds about this rank's shards plus one unit.
    shard_group, replicate_group: hybrid sharding (see groups.py and ``hybrid_groups``): shards within
        ``shard_group``, replicas across ``replicate_group``. ``process_group`` alone is plain FSDP
        (the same as ``shard_group`` alone); do not pass both.

    The ranks-agree check (one collective per group) runs after every unit is sliced (slicing runs none):
    ranks that built different models all raise before the first gather. After an error during the walk
    (a unit still on ``meta``, tied across units, ...) the model is half-wrapped: build it again.
    """
    units = _validate_units(model, units)
    _validate_options(compute_dtype, reduce_dtype, dict(prefetch=prefetch, reshard_after_forward=reshard_after_forward,
                                                        offload=offload), materialize)
    unit_ids, home = {id(u) for u in units}, {}
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    names[id(model)] = "root"
    prefixes = {id(m): "" if m is model else names[id(m)] + "." for m in [model, *units]}
    for module in [model, *units]:  # refuse ties across units before anything changes (seen again per unit)
        _collect_unit(module, prefixes[id(module)], unit_ids, home)
    layout = resolve_layout(process_group, shard_group, replicate_group)

    description, device, host = [], None, None
    sharded = None
    for module in [model, *units]:
        if materialize is not None and module is not model:
            materialize(module)
        members = _collect_unit(module, prefixes[id(module)], unit_ids, home)
        device = _check_unit(names[id(module)], members, device, description)
        if sharded is None:  # the root's tensors tell the compute device
            device = device or torch.device("cpu")
            host = HostOffload(device) if offload else None
            sharded = ShardedModel(model, layout, prefetch, reshard_after_forward, host)
        sharded.units.append(_shard_unit(
            sharded, module, names[id(module)], members, layout=layout, device=device or torch.device("cpu"),
            compute_dtype=compute_dtype, reduce_dtype=reduce_dtype, offload=host))
        del members  # nothing here references the unit's full tensors now: they are freed before the next
    device = device or torch.device("cpu")
    check_ranks_agree("\n".join(description), layout.shard_group, device)
    if layout.replicate_size > 1:
        check_ranks_agree("\n".join(description), layout.replicate_group, device)
        check_layout(layout, device)
    if host is not None:
        host.build_arena([group for unit in sharded.units for group in unit.groups])
    return sharded
