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


def _collect_tensors(model, units) -> dict:
    """For each unit (root included): {id(tensor): [tensor, keys, owners, trainable, persistent]}.

    A tensor belongs to the innermost unit above the module that registers it; a tensor registered in
    two units (weights tied across units) is refused.
    """
    unit_ids = {id(u) for u in units}
    persistent = set(model.state_dict(keep_vars=True))
    found = {id(m): {} for m in [model, *units]}
    home = {}  # id(tensor) -> id(unit)

    def visit(module, prefix, unit):
        unit = module if id(module) in unit_ids else unit
        registered = [(n, t, t.requires_grad) for n, t in module.named_parameters(recurse=False)]
        registered += [(n, t, False) for n, t in module.named_buffers(recurse=False)]
        for name, tensor, trainable in registered:
            key = prefix + name
            if home.setdefault(id(tensor), id(unit)) != id(unit):
                raise ValueError(f"model: tensor {key!r} is shared by two units; keep tied tensors in one unit")
            entry = found[id(unit)].setdefault(id(tensor), [tensor, [], [], trainable, False])
            if key not in entry[1]:
                entry[1].append(key)
            if (module, name) not in entry[2]:
                entry[2].append((module, name))
            entry[4] |= key in persistent
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.", unit)

    visit(model, "", model)
    return found


def shard_model(model, units, process_group=None, compute_dtype=None, reduce_dtype=torch.float32,
                prefetch=True, reshard_after_forward=True, offload=False) -> ShardedModel:
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
    """
    units = _validate_units(model, units)
    found = _collect_tensors(model, units)
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized (call init_process_group first)")
    group = process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    names[id(model)] = "root"

    description, devices = [], set()
    for module in [model, *units]:
        for tensor, keys, _, trainable, _ in found[id(module)].values():
            description.append(f"{names[id(module)]}:{keys}:{tuple(tensor.shape)}:{tensor.dtype}:{trainable}")
            devices.add(tensor.device)
    if len(devices) > 1:
        raise ValueError(f"model: all tensors must be on one device, found {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    if device.type == "meta":
        raise ValueError("model: tensors are on the meta device; materialize them before shard_model")
    check_ranks_agree("\n".join(description), group, device)

    sharded = ShardedModel(model, group, prefetch, reshard_after_forward)
    for module in [model, *units]:
        by_group = {}
        for entry in found[id(module)].values():
            by_group.setdefault((entry[0].dtype, entry[3]), []).append(entry)
        groups = []
        for (dtype, trainable), entries in by_group.items():
            slots = lay_out([(tensor, keys, owners, persistent) for tensor, keys, owners, _, persistent in entries])
            kind = "trainable" if trainable else "frozen"
            groups.append(FlatGroup(
                f"{names[id(module)]}[{str(dtype).replace('torch.', '')} {kind}]", [e[0] for e in entries], slots,
                trainable=trainable, group=group, rank=rank, world=world, device=device,
                compute_dtype=compute_dtype, reduce_dtype=reduce_dtype, offload=offload))
            for slot in slots:  # unregister: from now on the hooks set these attributes
                for owner, attribute in slot.owners:
                    delattr(owner, attribute)
            groups[-1].point_module_at_placeholders()
        found[id(module)] = None  # drop our references to the original tensors
        sharded.units.append(ShardedUnit(names[id(module)], module, groups, sharded))
    return sharded
