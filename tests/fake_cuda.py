"""Run the GPU code path with no GPU: tensors that claim ``cuda:0`` (FakeTensorMode) and a recorder of ops.

    python tests/fake_cuda.py build                      # compile the fake CUDA library, print its path
    LD_PRELOAD=<path> LD_LIBRARY_PATH=<torch/lib> python tests/fake_cuda.py \
        '{"offload": false, "checkpointing": false, "mistakes": false}'

The second prints one JSON line: what each phase did (build, forward, held-out loss, two training steps
through ``recipe.loop.train``, the metrics log, the adapter's tensors). How a CPU-only torch is made to
run CUDA tensors, and what the recorder counts: ``tests/fake_cuda_device.py``.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_cuda_device import Recorder, build_library, check_preloaded, cuda_runtime_stand_ins  # noqa: E402

BATCH, SEQ_LEN, GRAD_ACCUM, STEPS = 2, 16, 2, 2


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


class HostSampler:
    """``recipe.data.Sampler`` over random windows, drawing real host batches as on a GPU machine (the
    data stays on the host until the step copies it)."""

    def __init__(self):
        from recipe.data import Sampler

        with _disable_current_modes():
            self.sampler = Sampler(torch.randint(0, 256, (64, SEQ_LEN), generator=torch.Generator().manual_seed(0)),
                                   BATCH, rank=0, world_size=2)

    def next_batch(self):
        with _disable_current_modes():
            return self.sampler.next_batch()


def _make_mistakes(model) -> None:
    """Two 0-d CPU tensors in the GPU path (torch accepts them; a GPU pays a host-to-device copy per call):
    one multiplies the first decoder layer's output (forward), one is added to the gradient flowing back
    into the second layer's output (backward)."""
    def grad_hook(module, inputs, out):
        if out.requires_grad:  # not under no_grad
            out.register_hook(lambda grad: grad + torch.tensor(0.0))

    model.model.layers[0].register_forward_hook(lambda module, inputs, out: out * torch.tensor(1.0))
    model.model.layers[1].register_forward_hook(grad_hook)


def _train(built, out: Path, events: list) -> dict:
    """``STEPS`` optimizer steps of ``recipe.loop.train`` (``GRAD_ACCUM`` micro-batches each), every step
    and the metrics log recorded on their own. AdamW as ``recipe.job.prepare_run`` makes it, with the
    multi-tensor kernels its default picks for CUDA tensors (a fake tensor's type makes it pick the
    per-tensor loop)."""
    import recipe.loop
    from recipe.data import Batch

    steps, logs, real_step, real_numbers = [], [], recipe.loop.train_step, recipe.loop.to_numbers

    def recorded(calls, function):
        def call(*args):
            waits = len(events)
            with Recorder("cuda:0") as rec:
                result = function(*args)
            calls.append({**rec.report(), "event_waits": len(events) - waits})
            return result
        return call

    heldout = [Batch.of_text(torch.randint(0, 256, (BATCH, SEQ_LEN), device="cuda:0"))]
    optimizer = torch.optim.AdamW(built.parameters, lr=1e-3, weight_decay=0.0, foreach=True)
    run = recipe.loop.Run(built.trainable, optimizer, HostSampler(), lambda: heldout, built.device, rank=0,
                          tokens_per_step=2 * BATCH * SEQ_LEN * GRAD_ACCUM, fingerprint={})
    config = recipe.loop.LoopConfig(steps=STEPS, grad_accum=GRAD_ACCUM, out=out, progress=False)
    with mock.patch.object(recipe.loop, "train_step", recorded(steps, real_step)), \
            mock.patch.object(recipe.loop, "to_numbers", recorded(logs, real_numbers)), Recorder("cuda:0") as rec:
        recipe.loop.train(run, config)  # the last step is evaluated: ``rec`` answers its one read
    return {"steps": steps, "logs": logs, "loop": rec.report(), "log_every": config.log_every,
            "metrics": (out / "metrics.jsonl").read_text().splitlines()}


def fake_cuda_run(offload: bool, checkpointing: bool, mistakes: bool) -> dict:
    """Build (2 ranks' view, as rank 0), one forward, the held-out loss, two training steps and the
    adapter's tensors, all on fake ``cuda:0`` with NCCL's contract; a dict of what each phase did."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import llama
    from recipe.build import BuildOptions, build
    from recipe.data import Batch
    from recipe.job import enable_activation_checkpointing
    from recipe.loop import evaluate

    check_preloaded()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    events, result = [], {}
    cudart = mock.Mock(cudaHostRegister=mock.Mock(return_value=0), cudaHostUnregister=mock.Mock(return_value=0))
    patches = [*cuda_runtime_stand_ins(events, cudart),
               mock.patch("torch.distributed.get_backend", lambda group=None: "nccl"),
               mock.patch.object(llama, "iter_checkpoint", _host_reads(llama.iter_checkpoint))]
    with contextlib.ExitStack() as stack, FakeTensorMode(allow_non_fake_inputs=True):
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        for patch in patches:
            stack.enter_context(patch)
        with Recorder("cuda:0", host_ok=True) as rec:
            built = build(BuildOptions(device="cuda:0", compute_dtype=torch.bfloat16, offload=offload))
        result["build"], result["linears"] = rec.report(), len(built.lora_names)
        if mistakes:
            _make_mistakes(built.model)
        if checkpointing:  # what the job does with --activation-checkpointing
            enable_activation_checkpointing(built.model.model.layers)
        ids = torch.randint(0, 256, (BATCH, SEQ_LEN), device="cuda:0")
        with Recorder("cuda:0", host_ok=True) as rec, torch.no_grad():  # constant tables: built once per device
            built.trainable.forward(ids)
        result["first_forward"] = rec.report()
        with Recorder("cuda:0") as rec, torch.no_grad():
            logits, _ = built.trainable.forward(ids)
        result["forward"] = {**rec.report(), "logits": f"{logits.dtype}@{logits.device}"}
        with Recorder("cuda:0") as rec:
            evaluate(built.trainable, [Batch.of_text(ids)])
        result["eval"] = rec.report()
        with tempfile.TemporaryDirectory() as out:
            result["train"] = _train(built, Path(out), events)
        with Recorder("cuda:0", host_ok=True) as rec:
            adapter = built.trainable.trainable_state_dict()
        result["adapter"] = {**rec.report(),
                             "tensors": sorted({f"{t.dtype}@{t.device}" for t in adapter.values()})}
    result["event_waits"], result["pinned_arenas"] = len(events), cudart.cudaHostRegister.call_count
    result["warnings"] = [str(w.message) for w in caught]
    return result


if __name__ == "__main__":
    if sys.argv[1] == "build":
        print(build_library())
    else:
        print(json.dumps(fake_cuda_run(**json.loads(sys.argv[1]))))
