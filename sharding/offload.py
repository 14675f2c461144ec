"""``offload=True``: shards in one exactly sized pinned host arena, copies on a side stream.

With offload a rank keeps its shards, and the fp32 master weights (so the optimizer steps on the CPU),
in host memory. Each gather copies the shard host -> device; each backward copies every gradient slice
device -> host. On a GPU both run on a dedicated *copy stream*, so they overlap the compute queued on
the compute stream (the all-gather that follows the upload is issued from the copy stream too, so NCCL
waits for the copy, not for the compute):

    compute stream  | unit i forward ...........................| wait | unit i+1 forward ...
    copy stream     |  H2D shard i+1 |                                    |  ...
    NCCL            |                | all-gather i+1 |

Gradient copies record an event each; the end of backward waits for those events (one host wait per
backward, not one per group) and only then adds the landed slices to ``master.grad``.

Pinned memory: torch's pinned allocator rounds every allocation up to a power of two (+25% at 70B
scale). Here every host tensor of every group is a slice of one arena allocated once, after all units
are sliced, with each slice aligned to 64 bytes; it is then page-locked with ``cudaHostRegister``, so the
pinned bytes are exactly ``pinned_bytes`` (what the planner counts). The arena's pages are first
touched as the shards are copied in, and each old shard is dropped right after, so building it does
not double the host memory.

On a CPU device (the tests) there is no stream and nothing to pin: every copy is a plain copy and the
arena is ordinary memory. The GPU path is written but not yet run on a GPU.
"""
import contextlib
import weakref

import torch

ALIGN = 64  # bytes: every arena slice starts on a cache line (and is aligned for any dtype view)


def _pin(arena: torch.Tensor, owner) -> None:
    """Page-lock the arena's memory in place (exact size); unlock it when ``owner`` is collected (the
    arena outlives it, so unlocking early only turns later copies from it into staged ones)."""
    cudart, pointer = torch.cuda.cudart(), arena.data_ptr()
    error = int(cudart.cudaHostRegister(pointer, arena.numel(), 0))
    if error != 0:
        raise RuntimeError(f"offload: cudaHostRegister of the {arena.numel()}-byte arena failed (cudaError {error})")
    weakref.finalize(owner, cudart.cudaHostUnregister, pointer)


class HostOffload:
    """The copy stream, the pinned arena and the gradient copies in flight, shared by a model's groups."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.pinned_bytes = 0
        self._in_flight = []  # (event or None, device tensor kept alive until it landed, callback)

    def build_arena(self, groups) -> None:
        """Move every group's host tensors into slices of one arena, then pin it (on a GPU)."""
        requests, total = [], 0
        for group in groups:
            for name, (numel, dtype) in group.host_buffers().items():
                requests.append((group, name, total, numel, dtype))
                total += -(-numel * dtype.itemsize // ALIGN) * ALIGN
        self.arena = torch.empty(total, dtype=torch.uint8)  # untouched pages: memory grows as shards move in
        per_group = {}
        for group, name, offset, numel, dtype in requests:
            # A tensor of its own on the arena's memory, not a view: views share the arena's version
            # counter, so a gradient landing in one slice would make every gathered shard look changed.
            view = torch.empty(0, dtype=dtype).set_(self.arena.untyped_storage(), offset // dtype.itemsize, (numel,))
            per_group.setdefault(group, {})[name] = view
        for group, views in per_group.items():
            group.use_host_buffers(views)
        if self.stream is not None and total:
            _pin(self.arena, self)
            self.pinned_bytes = total

    @contextlib.contextmanager
    def copy_stream(self):
        """Run the block on the copy stream, ordered after everything queued so far on the compute stream
        (so memory the compute stream freed may be reused here)."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def to_host(self, grad: torch.Tensor, landing: torch.Tensor, then) -> None:
        """Copy ``grad`` (device) into ``landing`` (host, pinned) without blocking; ``then()`` runs in
        ``finish`` once it has landed."""
        with self.copy_stream():
            landing.copy_(grad, non_blocking=self.stream is not None)
            event = torch.cuda.Event() if self.stream is not None else None
            if event is not None:
                event.record(self.stream)
        self._in_flight.append((event, grad, then))

    def finish(self) -> None:
        """End of backward: wait for the gradient copies (the one host sync of offload), then apply them."""
        for event, _, then in self._in_flight:
            if event is not None:
                event.synchronize()
            then()
        self._in_flight.clear()
