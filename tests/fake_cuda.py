"""Run the GPU code path with no GPU: tensors that claim ``cuda:0`` (FakeTensorMode) and a recorder of ops.

    python tests/fake_cuda.py '{"offload": false, "mistake": false}'   # prints one JSON line of counts
    python tests/fake_cuda.py '{"train_on_cpu": true, "offload": true, "out": "/tmp/run"}'

What a CPU-only torch allows (torch 2.13, measured while writing this file):
- ``FakeTensorMode`` creates tensors on ``cuda:0`` and runs shape/dtype/device propagation of every op.
- Slicing, random fills and views of a CUDA tensor need c10's *device guard* for CUDA, which a CPU build
  does not link ("PyTorch is not linked with support for cuda devices"). `load_fake_cuda_guard` compiles
  five lines of C++ that register c10's own ``FakeGuardImpl`` for CUDA; then build and forward run.
- Autograd's engine still refuses a CUDA tensor ("Cannot access accelerator device when none is
  available"): no backward, so no optimizer step, on fake CUDA. The training steps run for real on the
  CPU instead (`train_on_cpu`), recorded the same way.

`Recorder` sees every aten op and every c10d collective as it is dispatched. It answers the ops whose
result needs real data (``.item()``, ``bincount``) with placeholders and counts those on a CUDA tensor:
each is a host sync on a GPU.
"""
from __future__ import annotations

import collections
import contextlib
import json
import sys
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

# What NCCL reduces and gathers (ncclDataType_t): no bool, no complex.
NCCL_DTYPES = {torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
               torch.float64}
ROOT = Path(__file__).resolve().parents[1]
# Host <-> device copies, the only ops that may mix devices; lift_fresh is torch.tensor(data, device=...)
# staging its Python numbers on the host before the copy.
TRANSFERS = {"aten::_to_copy", "aten::copy_", "aten::lift_fresh"}
GUARD = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
"""


def load_fake_cuda_guard() -> None:
    from torch.utils.cpp_extension import load_inline

    load_inline("home70b_fake_cuda_guard", cpp_sources=[GUARD], functions=[], is_python_module=False)


def _caller() -> str:
    """"file:function" of the innermost frame outside this file and torch's private modules (dispatch,
    dynamo's wrappers): the code that asked for the number."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        private = "/torch/_" in frame.filename or "/_python_dispatch" in frame.filename
        if frame.filename != __file__ and not private:
            path = Path(frame.filename)
            ours = path.is_relative_to(ROOT) and "site-packages" not in path.parts  # a venv may sit in the checkout
            where = str(path.relative_to(ROOT)) if ours else f"{path.parent.name}/{path.name}"
            return f"{where}:{frame.name}"
    return "?"


class Recorder(TorchDispatchMode):
    """Counts ops, host syncs and collectives; notes every op that sees a tensor off ``device``.

    ``host_ok``: whether ops on CPU tensors alone are allowed (loading streams the checkpoint through the
    host); an op that mixes devices other than a copy is always wrong."""

    def __init__(self, device: str, host_ok: bool = False):
        super().__init__()
        self.device, self.host_ok = torch.device(device), host_ok
        self.ops, self.syncs, self.scalar_reads, self.wrong = 0, 0, 0, []
        self.collectives, self.scalar_sources = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += args[0].device.type == "cuda"
            self.scalar_reads += 1
            self.scalar_sources[_caller()] += 1
            return True if args[0].dtype == torch.bool else (1.0 if args[0].dtype.is_floating_point else 0)
        if func is torch.ops.aten.bincount.default:  # data-dependent size: only its maximum is ever read
            return torch.zeros(max(kwargs.get("minlength", 0), 1), dtype=torch.int64, device=args[0].device)
        out = func(*args, **kwargs)
        name, tensors = func.name(), [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if t.device.type != "meta"}
        if name.startswith("c10d::"):
            self.collectives.update(f"{t.dtype}@{t.device}" for t in tree_leaves((args, kwargs))
                                    if isinstance(t, torch.Tensor))
        if name.startswith("prim::"):  # queries (a tensor's device), not kernels
            return out
        self.ops += 1
        off_device = devices - {self.device}
        if name not in TRANSFERS and off_device and (len(devices) > 1 or not self.host_ok):
            self.wrong.append(f"{name} on {sorted(map(str, devices))}")
        return out

    def report(self) -> dict:
        return {"ops": self.ops, "syncs": self.syncs, "scalar_reads": self.scalar_reads,
                "scalar_sources": dict(self.scalar_sources), "collectives": sorted(self.collectives),
                "wrong": self.wrong[:5]}


def _host_reads(iterate):
    """``llama.iter_checkpoint`` reading real bytes from disk with every mode off (the file is on the host)."""
    def reads(*args, **kwargs):
        stream = iterate(*args, **kwargs)
        while True:
            with _disable_current_modes():
                item = next(stream, None)
            if item is None:
                return
            yield item
    return reads


class _Stream:
    def wait_stream(self, other):
        pass


def _cuda_runtime_stand_ins(events: list, cudart: mock.Mock) -> list:
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


def fake_cuda_run(offload: bool, mistake: bool) -> dict:
    """Build (2 ranks' view, as rank 0), one forward, the held-out loss and the adapter's tensors, all on
    fake ``cuda:0`` with NCCL's contract; a dict of what each phase did."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import llama
    from recipe.build import BuildOptions, build
    from recipe.data import Batch
    from recipe.loop import evaluate

    load_fake_cuda_guard()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    events, result = [], {}
    cudart = mock.Mock(cudaHostRegister=mock.Mock(return_value=0), cudaHostUnregister=mock.Mock(return_value=0))
    patches = [*_cuda_runtime_stand_ins(events, cudart),
               mock.patch("torch.distributed.get_backend", lambda group=None: "nccl"),
               mock.patch.object(llama, "iter_checkpoint", _host_reads(llama.iter_checkpoint))]
    with contextlib.ExitStack() as stack, FakeTensorMode(allow_non_fake_inputs=True):
        for patch in patches:
            stack.enter_context(patch)
        with Recorder("cuda:0", host_ok=True) as rec:
            built = build(BuildOptions(device="cuda:0", compute_dtype=torch.bfloat16, offload=offload))
        result["build"], result["linears"] = rec.report(), len(built.lora_names)
        if mistake:  # a 0-d CPU tensor in the forward: torch accepts it, the GPU pays a copy per call
            built.model.model.layers[0].register_forward_hook(lambda m, i, out: out * torch.tensor(1.0))
        ids = torch.randint(0, 256, (2, 16), device="cuda:0")
        with Recorder("cuda:0", host_ok=True) as rec, torch.no_grad():  # constant tables: built once per device
            built.trainable.forward(ids)
        result["first_forward"] = rec.report()
        with Recorder("cuda:0") as rec, torch.no_grad():
            logits, _ = built.trainable.forward(ids)
        result["forward"] = {**rec.report(), "logits": f"{logits.dtype}@{logits.device}"}
        with Recorder("cuda:0") as rec:
            evaluate(built.trainable, [Batch.of_text(ids)])
        result["eval"] = rec.report()
        with Recorder("cuda:0", host_ok=True) as rec:
            adapter = built.trainable.trainable_state_dict()
        result["adapter"] = {**rec.report(),
                             "tensors": sorted({f"{t.dtype}@{t.device}" for t in adapter.values()})}
    result["event_waits"], result["pinned_arenas"] = len(events), cudart.cudaHostRegister.call_count
    return result


def train_on_cpu(offload: bool, out: str, grad_accum: int = 2, steps: int = 2) -> dict:
    """``steps`` real optimizer steps of recipe.train on the CPU (1 rank, gloo), each one recorded: ops,
    ``.item()``-like calls on any tensor (each would be a host sync on a GPU), collectives' dtypes."""
    import recipe.loop
    from recipe import train

    steps_seen, real_step = [], recipe.loop.train_step

    def recorded_step(run, config, step):
        with Recorder("cpu") as rec:
            record = real_step(run, config, step)
        steps_seen.append(rec.report())
        return record

    argv = ["--device", "cpu", "--dtype", "fp32", "--steps", str(steps), "--grad-accum", str(grad_accum),
            "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--no-progress", "--data", "pydoc", "--out", out]
    with mock.patch.object(recipe.loop, "train_step", recorded_step):
        train.main(argv + (["--offload"] if offload else []))
    return {"steps": steps_seen, "metrics": (Path(out) / "metrics.jsonl").read_text().splitlines()}


if __name__ == "__main__":
    options = json.loads(sys.argv[1])
    if options.pop("train_on_cpu", False):
        print(json.dumps(train_on_cpu(**options)))
    else:
        print(json.dumps(fake_cuda_run(**options)))
