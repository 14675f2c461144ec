"""A CUDA device that is not there: c10's fake device guard and fake CUDA hooks, preloaded; an op recorder.

What a CPU-only torch allows (torch 2.13, measured while writing this file):
- ``FakeTensorMode`` creates tensors on ``cuda:0`` and runs shape/dtype/device propagation of every op.
- Slicing, random fills and views of a CUDA tensor need c10's *device guard* for CUDA, which a CPU build
  does not link ("PyTorch is not linked with support for cuda devices"); autograd's engine asks ATen's
  *CUDA hooks* whether a device exists ("Cannot access accelerator device when none is available").
  `SOURCE` registers c10's own ``FakeGuardImpl`` for CUDA and hooks that answer "one CUDA device, index 0,
  context up". The hooks are created once, lazily, when torch first asks, so the library must be loaded
  before torch initialises: `build_library` compiles it (``load_inline``, cached under
  ``~/.cache/torch_extensions``) and `preload_env` names it in ``LD_PRELOAD`` of the process that runs.
  Python's ``torch.cuda.is_available()`` still says False (it asks the missing ``torch._C`` CUDA module),
  so torch.cuda's stream, event and pinning calls are stood in for (`cuda_runtime_stand_ins`).

`Recorder` sees every aten op and every c10d collective as it is dispatched. It answers the ops whose
result needs real data (``.item()``, ``bincount``) with placeholders and counts those on a CUDA tensor,
and every blocking device-to-host copy: each is a host sync on a GPU.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
# Host <-> device copies, the only ops that may mix devices; lift_fresh is torch.tensor(data, device=...)
# staging its Python numbers on the host before the copy.
COPIES = {"aten::_to_copy", "aten::copy_"}
TRANSFERS = COPIES | {"aten::lift_fresh"}
SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
struct FakeCUDAHooks : at::CUDAHooksInterface {
  FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isAvailable() const override { return true; }
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  int getNumGPUs() const override { return 1; }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
};
namespace at { C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, FakeCUDAHooks); }
"""


def build_library() -> str:
    """Compile `SOURCE` (once per source text: ``load_inline`` caches it) and return the ``.so``'s path.
    It also loads it into this process: call it in a process that runs nothing else."""
    from torch.utils.cpp_extension import load_inline

    return load_inline("home70b_fake_cuda", cpp_sources=[SOURCE], functions=[], is_python_module=False)


def preload_env(library: str) -> dict:
    """The environment of a process whose torch finds the fake CUDA device from its start."""
    libraries = [str(Path(torch.__file__).parent / "lib"), os.environ.get("LD_LIBRARY_PATH", "")]
    return {"LD_PRELOAD": library, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, libraries))}


def check_preloaded() -> None:
    if "home70b_fake_cuda" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError("run with LD_PRELOAD naming the fake CUDA library (tests/fake_cuda_device.py: preload_env)")


def caller() -> str:
    """"file:function" of the innermost frame outside this file and torch's private modules (dispatch,
    dynamo's wrappers): the code that asked for the op."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        private = "/torch/_" in frame.filename or "/_python_dispatch" in frame.filename
        if frame.filename != __file__ and not private:
            path = Path(frame.filename)
            ours = path.is_relative_to(ROOT) and "site-packages" not in path.parts  # a venv may sit in the checkout
            where = str(path.relative_to(ROOT)) if ours else f"{path.parent.name}/{path.name}"
            return f"{where}:{frame.name}"
    return "?"


class Recorder(TorchDispatchMode):
    """Counts ops, host syncs, collectives and host <-> device copies; notes every op that sees a tensor
    off ``device``.

    An op that mixes devices, other than a copy, is always wrong. Ops on host tensors alone are allowed
    with ``host_ok`` (loading streams the checkpoint through the host); otherwise each is filed under
    the code that asked for it in ``host``, for the caller to judge (counting the labels' targets on the
    host is right; a CPU tensor made where the GPU path meant a device one is not)."""

    def __init__(self, device: str, host_ok: bool = False):
        super().__init__()
        self.device, self.host_ok = torch.device(device), host_ok
        self.ops, self.syncs, self.scalar_reads = 0, 0, 0
        self.collectives, self.collective_ops, self.copies = Counter(), Counter(), Counter()
        self.scalar_sources, self.sync_sources, self.host, self.wrong = Counter(), Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            if args[0].device.type == "cuda":
                self.syncs += 1
                self.sync_sources[caller()] += 1
            self.scalar_reads += 1
            self.scalar_sources[caller()] += 1
            return True if args[0].dtype == torch.bool else (1.0 if args[0].dtype.is_floating_point else 0)
        if func is torch.ops.aten.bincount.default:  # data-dependent size: only its maximum is ever read
            return torch.zeros(max(kwargs.get("minlength", 0), 1), dtype=torch.int64, device=args[0].device)
        out = func(*args, **kwargs)
        name, tensors = func.name(), [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if t.device.type != "meta"}
        if name.startswith("c10d::"):
            self.collective_ops[name] += 1
            self.collectives.update(f"{t.dtype}@{t.device}" for t in tree_leaves((args, kwargs))
                                    if isinstance(t, torch.Tensor))
        if name.startswith("prim::"):  # queries (a tensor's device), not kernels
            return out
        self.ops += 1
        if name in COPIES:  # source -> destination: (input, output) of _to_copy, (src, self) of copy_
            source, target = (args[0], out) if name == "aten::_to_copy" else (args[1], args[0])
            self.copies[f"{source.device.type}->{target.device.type}"] += 1
            non_blocking = args[2] if name == "aten::copy_" and len(args) > 2 else kwargs.get("non_blocking", False)
            if source.device.type == "cuda" and target.device.type == "cpu" and not non_blocking:
                self.syncs += 1  # the host waits for the copy, so for everything queued before it
                self.sync_sources[caller()] += 1
        if name in TRANSFERS or not devices - {self.device}:
            return out
        if devices == {torch.device("cpu")}:
            if not self.host_ok:
                self.host[caller()] += 1
        else:
            self.wrong[f"{name} on {sorted(map(str, devices))} from {caller()}"] += 1
        return out

    def report(self) -> dict:
        return {"ops": self.ops, "syncs": self.syncs, "sync_sources": dict(self.sync_sources),
                "scalar_reads": self.scalar_reads, "scalar_sources": dict(self.scalar_sources),
                "collectives": sorted(self.collectives), "collective_ops": dict(self.collective_ops),
                "host": dict(self.host), "wrong": dict(self.wrong),
                "copies": {k: n for k, n in self.copies.items() if k in ("cpu->cuda", "cuda->cpu")}}


class _Stream:
    def wait_stream(self, other):
        pass


def cuda_runtime_stand_ins(events: list, cudart: mock.Mock) -> list:
    """torch.cuda's runtime calls the GPU path makes, answered without a GPU; event waits are counted in
    ``events``, page-locking calls in ``cudart``."""
    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            events.append(1)

    stand_ins = {"Stream": lambda device=None: _Stream(), "Event": Event,
                 "current_stream": lambda device=None: _Stream(),
                 "stream": lambda s: contextlib.nullcontext(), "cudart": lambda: cudart, "current_device": lambda: 0,
                 "set_device": lambda device: None, "reset_peak_memory_stats": lambda device=None: None,
                 "max_memory_allocated": lambda device=None: 0}
    return [mock.patch(f"torch.cuda.{name}", value) for name, value in stand_ins.items()]
