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
    """``with TensorMemory() as mem: ...`` then ``mem.peak`` / ``mem.current`` (bytes)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()  # ids of counted storages

    def reset_peak(self) -> None:
        self.peak = self.current

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = id(storage), storage.nbytes()
        if key in self._live or nbytes == 0 or storage.device.type == "meta":
            return
        self._live.add(key)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._count(storage)
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
