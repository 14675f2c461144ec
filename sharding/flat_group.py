"""One flat, padded, sharded buffer: the tensors of one unit that share a trainability (and, if trainable, a dtype).

Flatten -> pad -> shard (ZeRO-3, and FSDP's FlatParameter, Zhao et al. 2023 "PyTorch FSDP", Sec. 3.2):

    tensors   [ w1 (6) | w2 (3) | b (2) ]             laid end to end
    padded    [ w1     | w2     | b  |pad]            numel rounded up to a multiple of world (12)
    rank 0    [0 .. 3]  rank 1 [4 .. 7]  rank 2 [8 .. 11]   each rank keeps one slice

Each rank keeps only its slice. Before compute the slices are all-gathered into ``full`` and the
module's tensors are pointed at views of it; afterwards the storage of ``full`` is resized to zero
bytes and re-grown (refilled in place) by the next gather. The views that autograd saved for backward
keep pointing at that storage, which is why backward gathers again first; the module's attributes are
meanwhile pointed at meta placeholders, so stray reads fail loudly instead of reading freed memory.

A frozen group is raw bytes: every frozen tensor of the unit (uint8 NF4 codes, fp32 absmax, bf16 norms)
is laid out as bytes, each at an offset aligned to its element size, so one all-gather moves them all
and a view reinterprets each one's bytes in its own dtype. A unit therefore needs one all-gather for its
frozen tensors plus one per dtype of its trainable tensors (usually one).

A trainable group keeps its slice as an fp32 *master* ``nn.Parameter``: that is what the optimizer
steps. ``full`` is then an autograd leaf and the module's parameters are views of it, so autograd
itself assembles the whole flat gradient in ``full.grad``; a post-accumulate-grad hook reduce-scatters
it over the shard group (summed), all-reduces the slice over the replicate group under hybrid sharding,
and divides by the number of data-parallel ranks: the average of plain data parallelism.
"""
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .collectives import all_gather_bytes, all_reduce_sum, log, reduce_scatter_sum


@dataclass
class Slot:
    """Where one original tensor lives in the flat buffer, and every (module, attribute) that holds it."""

    keys: list[str]  # fully qualified state-dict names (several when a tensor is tied inside the unit)
    owners: list[tuple[nn.Module, str]]  # (module, attribute name) pairs to point at the view
    offset: int  # in elements of the flat buffer (bytes in a frozen group)
    shape: torch.Size
    dtype: torch.dtype
    persistent: bool  # False for non-persistent buffers: left out of full_state_dict
    span: int  # elements of the flat buffer the tensor takes
    numel: int = field(init=False)  # elements of the tensor itself

    def __post_init__(self):
        self.numel = self.shape.numel()


def lay_out(members, flat_dtype: torch.dtype) -> list[Slot]:
    """Slots for tensors laid end to end in a flat buffer of ``flat_dtype``; ``members`` have
    ``tensor``, ``keys``, ``owners`` and ``persistent``. A tensor of a wider dtype than the buffer
    (fp32 in bytes) starts at a multiple of its element size, so its bytes can be viewed as that dtype."""
    slots, offset = [], 0
    for member in members:
        tensor = member.tensor
        per_element = tensor.element_size() // flat_dtype.itemsize
        if per_element * flat_dtype.itemsize != tensor.element_size():
            raise ValueError(f"{member.keys[0]!r}: dtype {tensor.dtype} does not fit a flat {flat_dtype} buffer")
        offset = -(-offset // per_element) * per_element
        slots.append(Slot(member.keys, member.owners, offset, tensor.shape, tensor.dtype, member.persistent,
                          span=tensor.numel() * per_element))
        offset += slots[-1].span
    return slots


class FlatGroup:
    """The sharded storage of one group of one unit, and its gather / free / reduce."""

    def __init__(self, name, tensors, slots, *, trainable, layout, device, compute_dtype, reduce_dtype,
                 offload=None):
        self.name, self.slots, self.trainable, self.layout = name, slots, trainable, layout
        self.rank, self.world = layout.shard_rank, layout.shard_size
        self.device, self.reduce_dtype, self.offload = device, reduce_dtype, offload
        self.dtype = tensors[0].dtype if trainable else torch.uint8  # the flat buffer's dtype
        end = slots[-1].offset + slots[-1].span
        self.padded_numel = -(-end // self.world) * self.world  # ceil to a multiple of world
        self.shard_numel = self.padded_numel // self.world
        self.padding = self.padded_numel - end

        with torch.no_grad():
            shard = self._my_slice(tensors, self.rank * self.shard_numel, device)
            if trainable:  # the fp32 master shard is the only copy of the values
                shard = shard.float()
            if offload is not None:  # CPU memory; moved into the pinned arena once every unit is sliced
                shard = shard.cpu()
        self.master = nn.Parameter(shard) if trainable else None
        self.local = None if trainable else shard
        self.gather_dtype = (compute_dtype or self.dtype) if trainable else self.dtype
        self._landing = self._grad_home = None  # offload: pinned slices for the gradient (use_host_buffers)

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
        self._placeholders = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in slots]
        self._pending = None  # (async work, source tensor kept alive) while a gather is in flight
        self._gathered_from = None  # version of the shard when last gathered, to spot a stale copy

    def flat_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as a 1-D run of this group's flat elements (its raw bytes in a frozen group)."""
        flat = tensor.detach().reshape(-1)
        return flat.view(torch.uint8) if not self.trainable else flat

    def value_of(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        """Slot ``slot`` read out of a whole flat tensor of this group, in the original dtype and shape."""
        piece = flat[slot.offset:slot.offset + slot.span]
        return (piece.to(slot.dtype) if self.trainable else piece.view(slot.dtype)).view(slot.shape)

    def _my_slice(self, tensors, start, device) -> torch.Tensor:
        """Elements [start, start + shard_numel) of the padded flat buffer, copied tensor by tensor: the
        whole flat buffer is never built (for a 70B layer it would be one more copy of the layer)."""
        shard = torch.zeros(self.shard_numel, dtype=self.dtype, device=device)  # padding and gaps stay zero
        for tensor, slot in zip(tensors, self.slots):
            low, high = max(start, slot.offset), min(start + self.shard_numel, slot.offset + slot.span)
            if low < high:
                shard[low - start:high - start] = self.flat_of(tensor)[low - slot.offset:high - slot.offset]
        return shard

    # ------------------------------------------------------------------ offload: the pinned arena
    def host_buffers(self) -> dict:
        """{name: (numel, dtype)} this group keeps in the offload arena: its shard, and for a trainable
        group the landing slice of the gradient's device-to-host copy and the gradient itself."""
        if self.offload is None:
            return {}
        wanted = {"shard": (self.shard_numel, self._source().dtype)}
        if self.trainable:
            wanted |= {"landing": (self.shard_numel, self.reduce_dtype), "grad": (self.shard_numel, self.master.dtype)}
        return wanted

    def use_host_buffers(self, views: dict) -> None:
        """Move the shard into its arena slice (the old tensor is dropped) and keep the gradient slices."""
        with torch.no_grad():
            views["shard"].copy_(self._source())
        if self.trainable:
            self.master.data = views["shard"]
            self._landing, self._grad_home = views["landing"], views["grad"]
        else:
            self.local = views["shard"]

    # ------------------------------------------------------------------ gather / free
    @property
    def is_gathered(self) -> bool:
        return self._buffer.untyped_storage().nbytes() > 0

    def _source(self) -> torch.Tensor:
        return self.master if self.trainable else self.local

    def start_gather(self, why: str = "") -> None:
        """Issue the all-gather of this group into ``full`` (no-op if gathered and still up to date); ``wait``
        completes it. With offload on a GPU the shard's host-to-device copy and the all-gather are queued
        behind the copy stream, so they overlap the compute already queued."""
        source = self._source()
        if self._pending is not None or (self.is_gathered and self._gathered_from == source._version):
            return
        log.debug("rank %d gather %s (%d bytes)%s", self.rank, self.name, self._nbytes, why)
        self._buffer.untyped_storage().resize_(self._nbytes)  # allocated on the compute stream, which frees it
        copies = self.offload.copy_stream() if self.offload is not None else contextlib.nullcontext()
        with torch.no_grad(), copies:
            shard = source.to(self.device, non_blocking=True).to(self.gather_dtype)
            work = all_gather_bytes(self._buffer, shard, self.layout.shard_group, async_op=True)
        self._gathered_from = source._version
        self._pending = (work, shard)

    def wait(self) -> None:
        """Complete the gather (on a GPU: the compute stream waits for it; the host does not)."""
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
        sizes, cursor = [], 0
        for slot in self.slots:  # alignment gaps, slots and the padding: consecutive pieces of `full`
            sizes += [slot.offset - cursor, slot.span]
            cursor = slot.offset + slot.span
        pieces = torch.split(self.full, sizes + [self.padding])  # one autograd node: backward concatenates
        if pieces[0].grad_fn is not None:  # trainable, grad enabled: free as soon as the grads are all in
            pieces[0].grad_fn.register_prehook(self._free_before_concatenating_grads)
        views = [pieces[2 * i + 1] for i in range(len(self.slots))]
        views = [v.view(s.shape) if self.trainable else v.view(s.dtype).view(s.shape) for v, s in zip(views, self.slots)]
        self._point_at(views)

    def _free_before_concatenating_grads(self, grads) -> None:
        """Backward of the split into views is about to concatenate the views' gradients into ``full.grad``.
        Every node that used these parameters has run (each produced its parameter's gradient), so the
        gathered values are dead: free them before the concatenation allocates a whole-size gradient,
        instead of at the unit's post-backward (as FSDP2 reshards before it reduce-scatters)."""
        self.free()

    def point_module_at_placeholders(self) -> None:
        """While freed, attributes hold meta tensors: shape and dtype readable, values refused (no dangling views)."""
        self._point_at(self._placeholders)

    def _point_at(self, tensors) -> None:
        for slot, tensor in zip(self.slots, tensors):
            for module, attribute in slot.owners:
                setattr(module, attribute, tensor)

    # ------------------------------------------------------------------ gradients
    def reduce_scatter_grad(self) -> None:
        """Average ``full.grad`` over every data-parallel rank in reduce_dtype, keep our slice, add it to
        ``master.grad`` (with offload: after its device-to-host copy lands, at the end of backward)."""
        log.debug("rank %d reduce-scatter %s grad (%s)", self.rank, self.name,
                  str(self.reduce_dtype).replace("torch.", ""))
        layout = self.layout
        with torch.no_grad():
            grad = self.full.grad.to(self.reduce_dtype)
            self.full.grad = None
            mine = torch.empty(self.shard_numel, dtype=self.reduce_dtype, device=self.device)
            work = reduce_scatter_sum(mine, grad, layout.shard_group)
            del grad  # the whole-size gradient is dead once issued (as FSDP2 frees it): not alive during the sum
            work.wait()
            if layout.replicate_size > 1:  # hybrid: the replicas of this slice sum their partial sums
                all_reduce_sum(mine, layout.replicate_group, "replicate")
            mine.div_(layout.data_parallel_size)
            if self.offload is not None:
                self.offload.to_host(mine, self._landing, then=lambda: self._accumulate(self._landing))
            else:
                self._accumulate(mine)

    def _accumulate(self, mine: torch.Tensor) -> None:
        """master.grad = mine, or += mine under gradient accumulation (several backwards per step)."""
        with torch.no_grad():
            if self.master.grad is not None:
                self.master.grad += mine.to(self.master.grad.device)
            elif self._grad_home is not None:  # offload: the gradient lives in its arena slice
                self.master.grad = self._grad_home.copy_(mine)
            else:
                self.master.grad = mine.to(self.master.dtype)

    # ------------------------------------------------------------------ bookkeeping
    def shard_bytes(self) -> int:
        return self._source().numel() * self._source().element_size()

    def gathered_bytes(self) -> int:
        return self._buffer.untyped_storage().nbytes()
