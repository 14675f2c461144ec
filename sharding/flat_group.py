"""One flat, padded, sharded buffer: the tensors of one unit that share a dtype and trainability.

Flatten -> pad -> shard (ZeRO-3, and FSDP's FlatParameter, Zhao et al. 2023 "PyTorch FSDP", Sec. 3.2):

    tensors   [ w1 (6) | w2 (3) | b (2) ]             one dtype, laid end to end
    padded    [ w1     | w2     | b  |pad]            numel rounded up to a multiple of world (12)
    rank 0    [0 .. 3]  rank 1 [4 .. 7]  rank 2 [8 .. 11]   each rank keeps one slice

Each rank keeps only its slice. Before compute the slices are all-gathered into ``full`` and the
module's tensors are pointed at views of it; afterwards the storage of ``full`` is resized to zero
bytes and re-grown (refilled in place) by the next gather. The views that autograd saved for backward
keep pointing at that storage, which is why backward gathers again first; the module's attributes are
meanwhile pointed at meta placeholders, so stray reads fail loudly instead of reading freed memory.

A trainable group keeps its slice as an fp32 *master* ``nn.Parameter``: that is what the optimizer
steps. ``full`` is then an autograd leaf and the module's parameters are views of it, so autograd
itself assembles the whole flat gradient in ``full.grad``; a post-accumulate-grad hook reduce-scatters
it (summed, then divided by world: the data-parallel average) into ``master.grad``.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .collectives import all_gather_bytes, log, reduce_scatter_flat


@dataclass
class Slot:
    """Where one original tensor lives in the flat buffer, and every (module, attribute) that holds it."""

    keys: list  # fully qualified state-dict names (several when a tensor is tied inside the unit)
    owners: list  # (module, attribute name) pairs to point at the view
    offset: int
    shape: torch.Size
    persistent: bool  # False for non-persistent buffers: left out of full_state_dict
    numel: int = field(init=False)

    def __post_init__(self):
        self.numel = self.shape.numel()


def lay_out(members) -> list:
    """Slots for tensors laid end to end: members are (tensor, keys, owners, persistent) tuples."""
    slots, offset = [], 0
    for tensor, keys, owners, persistent in members:
        slots.append(Slot(keys, owners, offset, tensor.shape, persistent))
        offset += tensor.numel()
    return slots


class FlatGroup:
    """The sharded storage of one (dtype, trainable) group of one unit, and its gather/free/reduce."""

    def __init__(self, name, tensors, slots, *, trainable, group, rank, world, device,
                 compute_dtype, reduce_dtype, offload):
        self.name, self.slots, self.trainable = name, slots, trainable
        self.process_group, self.rank, self.world = group, rank, world
        self.device, self.reduce_dtype, self.offload = device, reduce_dtype, offload
        self.dtype = tensors[0].dtype
        numel = sum(t.numel() for t in tensors)
        self.padded_numel = -(-numel // world) * world  # ceil to a multiple of world
        self.shard_numel = self.padded_numel // world
        self.padding = self.padded_numel - numel

        with torch.no_grad():
            shard = self._my_slice(tensors, rank * self.shard_numel, device)
            if trainable:  # the fp32 master shard is the only copy of the values
                shard = shard.float()
            if offload:  # the shard lives in CPU memory and travels to `device` per gather
                shard = shard.cpu()
                if torch.cuda.is_available():
                    shard = shard.pin_memory()
        self.master = nn.Parameter(shard) if trainable else None
        self.local = None if trainable else shard
        self.gather_dtype = (compute_dtype or self.dtype) if trainable else self.dtype

        # Two tensor objects over one storage. Collectives write through `_buffer`; autograd sees `full`.
        # They have separate version counters, so re-gathering into the storage before backward does
        # not look like an in-place edit of tensors that autograd saved during forward.
        self._buffer = torch.empty(self.padded_numel, dtype=self.gather_dtype, device=device)
        self.full = torch.empty(0, dtype=self.gather_dtype, device=device).set_(
            self._buffer.untyped_storage(), 0, (self.padded_numel,))
        self._nbytes = self._buffer.untyped_storage().nbytes()
        self._buffer.untyped_storage().resize_(0)
        if trainable:
            self.full.requires_grad_(True)
            self.full.register_post_accumulate_grad_hook(lambda full: self.reduce_scatter_grad())
        self._placeholders = [torch.empty(s.shape, dtype=self.gather_dtype, device="meta") for s in slots]
        self._pending = None  # (async work, source tensor kept alive) while a gather is in flight
        self._gathered_from = None  # version of the shard when last gathered, to spot a stale copy

    def _my_slice(self, tensors, start, device) -> torch.Tensor:
        """Elements [start, start + shard_numel) of the padded flat buffer, copied tensor by tensor: the
        whole flat buffer is never built (for a 70B layer it would be one more copy of the layer)."""
        shard = torch.zeros(self.shard_numel, dtype=self.dtype, device=device)  # the padding stays zero
        offset = 0
        for tensor in tensors:
            low, high = max(start, offset), min(start + self.shard_numel, offset + tensor.numel())
            if low < high:
                shard[low - start:high - start] = tensor.detach().reshape(-1)[low - offset:high - offset]
            offset += tensor.numel()
        return shard

    # ------------------------------------------------------------------ gather / free
    @property
    def is_gathered(self) -> bool:
        return self._buffer.untyped_storage().nbytes() > 0

    def _source(self) -> torch.Tensor:
        return self.master if self.trainable else self.local

    def start_gather(self, async_op: bool, why: str = "") -> None:
        """Issue the all-gather of this group into ``full`` (no-op if gathered and still up to date)."""
        source = self._source()
        if self._pending is not None or (self.is_gathered and self._gathered_from == source._version):
            return
        log.debug("rank %d gather %s (%d bytes)%s", self.rank, self.name, self._nbytes, why)
        self._buffer.untyped_storage().resize_(self._nbytes)
        with torch.no_grad():
            shard = source.to(device=self.device, dtype=self.gather_dtype, non_blocking=True)
        work = all_gather_bytes(self._buffer, shard, self.process_group, async_op)
        self._gathered_from = source._version
        self._pending = (work, shard) if async_op else None

    def wait(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def free(self) -> None:
        self.wait()
        if self.is_gathered:
            log.debug("rank %d free %s", self.rank, self.name)
            self._buffer.untyped_storage().resize_(0)
            self.point_module_at_placeholders()

    def point_module_at_views(self) -> None:
        """Set every owner's attribute to a view of ``full`` (a plain tensor attribute, for params and buffers)."""
        sizes = [slot.numel for slot in self.slots] + [self.padding]
        pieces = torch.split(self.full, sizes)  # one autograd node: backward concatenates the grads
        self._point_at([piece.view(slot.shape) for slot, piece in zip(self.slots, pieces)])

    def point_module_at_placeholders(self) -> None:
        """While freed, attributes hold meta tensors: shape and dtype readable, values refused (no dangling views)."""
        self._point_at(self._placeholders)

    def _point_at(self, tensors) -> None:
        for slot, tensor in zip(self.slots, tensors):
            for module, attribute in slot.owners:
                setattr(module, attribute, tensor)

    # ------------------------------------------------------------------ gradients
    def reduce_scatter_grad(self) -> None:
        """Average ``full.grad`` over ranks in reduce_dtype, keep our slice, add it to ``master.grad``."""
        log.debug("rank %d reduce-scatter %s grad (%s)", self.rank, self.name,
                  str(self.reduce_dtype).replace("torch.", ""))
        with torch.no_grad():
            grad = self.full.grad.to(self.reduce_dtype)
            self.full.grad = None
            mine = torch.empty(self.shard_numel, dtype=self.reduce_dtype, device=self.device)
            reduce_scatter_flat(mine, grad, group=self.process_group)
            mine = mine.div_(self.world).to(device=self.master.device, dtype=self.master.dtype)
            if self.master.grad is None:
                self.master.grad = mine
            else:  # gradient accumulation: several backward passes before one optimizer step
                self.master.grad += mine

    # ------------------------------------------------------------------ bookkeeping
    def shard_bytes(self) -> int:
        return self._source().numel() * self._source().element_size()

    def gathered_bytes(self) -> int:
        return self._buffer.untyped_storage().nbytes()
