"""Measuring memory per rank on a CPU: the two numbers a GPU run would read off the device.

* ``TensorMemory``: live and peak bytes of tensor storage, the CPU analog of CUDA's
  ``torch.cuda.max_memory_allocated`` -- what the planner (``recipe/plan.py``) predicts. A
  ``TorchDispatchMode`` sees every tensor an ATen operation returns (forward, backward, collectives,
  optimizer), counts each new storage once, and subtracts it when the storage is freed. Outputs that
  alias an input (views, in-place ops) are not new memory. Tensors that exist before the mode is
  entered are not counted: enter it before building the model to measure everything.
* ``peak_rss_bytes``: the process's resident-set high-water mark (``VmHWM``), which
  ``reset_peak_rss`` sets back to the current RSS (Linux ``/proc/self/clear_refs``), so one phase
  -- e.g. loading a checkpoint -- can be measured on its own. It includes the Python and torch runtime.
"""
from __future__ import annotations

import resource
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """``with TensorMemory() as mem: ...`` then ``mem.peak`` / ``mem.current`` (bytes).

    Storages of 1 MiB or more are re-measured before every operation, because a sharder frees and
    re-grows a gathered buffer by resizing its storage (``untyped_storage().resize_``), which is not an
    ATen operation the mode would see. ``record_peak=True`` keeps, in ``at_peak``, the (bytes, op that
    made it) of every live storage of 1 MiB or more at the moment of the peak."""

    BIG = 2**20

    def __init__(self, record_peak: bool = False):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, list] = {}  # id(storage) -> [bytes now, op that made it]
        self._big: dict[int, weakref.ref] = {}  # the storages re-measured before every op
        self.record_peak = record_peak
        self.at_peak: list[tuple[int, str]] = []

    def reset_peak(self) -> None:
        self.peak = self.current

    def _set_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            if self.record_peak:
                self.at_peak = sorted((tuple(v) for v in self._live.values() if v[0] >= self.BIG), reverse=True)

    def _remeasure_big(self) -> None:
        for key, ref in list(self._big.items()):  # a copy: the cyclic collector may free one meanwhile
            storage = ref()
            if storage is not None and storage.nbytes() != self._live[key][0]:
                self.current += storage.nbytes() - self._live[key][0]
                self._live[key][0] = storage.nbytes()

    def _count(self, storage: torch.UntypedStorage, op: str) -> None:
        key, nbytes = id(storage), storage.nbytes()
        if key in self._live or nbytes == 0 or storage.device.type == "meta":
            return
        self._live[key] = [nbytes, op]
        if nbytes >= self.BIG:
            self._big[key] = weakref.ref(storage)
        self.current += nbytes
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key)[0]
        self._big.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._remeasure_big()
        self._set_peak()
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._count(storage, str(func))
        self._remeasure_big()
        self._set_peak()
        return out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS") if sys.platform == "linux" else 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or since the last ``reset_peak_rss``."""
    if sys.platform == "linux":
        return _status_bytes("VmHWM")
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, others kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Start a new RSS high-water mark (Linux); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
