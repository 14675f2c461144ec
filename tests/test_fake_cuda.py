"""The GPU code path without a GPU: device placement, NCCL's contract, host syncs and ops, counted.

On fake ``cuda:0`` tensors (``tests/fake_cuda_device.py``: FakeTensorMode, c10's fake device guard and
fake CUDA hooks preloaded so that autograd runs, a fake 2-rank process group answering as NCCL,
torch.cuda's stream/event/pinning calls stood in for) the recipe builds the bundled model on the GPU path
(checkpoint streamed from the host, each linear quantized on the device, sharded), runs a forward and the
held-out loss, then two optimizer steps of ``recipe.loop.train`` (gradient accumulation 2: forward,
backward, the gradients' reduce-scatter, clipping, AdamW, the metrics log, the last step's evaluation),
then gathers the adapter's tensors: once plainly, once with ``--offload`` (the device-to-host gradient
copies and their event waits, the optimizer on the host shards) and activation checkpointing (each
layer's forward recomputed in backward). Every op is recorded: each must see only ``cuda:0`` tensors (a
copy may cross devices; loading may compute on the host; in a step only the work listed in `HOST_WORK`
runs on host tensors), every collective gets a CUDA tensor of a dtype NCCL supports, and the host syncs
(``.item()`` on a CUDA tensor, a blocking device-to-host copy), host <-> device copies, all-gathers and
ops dispatched (one kernel launch each, or less when fused) are counted and bounded: a step syncs
nothing (with offload: once, for the clipping scale its host optimizer needs), the metrics log once per
``log_every`` steps.

Not covered, because fake tensors or a CPU build cannot run them:
- activation checkpointing's CUDA RNG state: torch.cuda is never initialised here, so ``checkpoint``
  neither saves nor restores it (the recompute itself runs; with dropout 0 it draws nothing);
- the Triton dequantize launch (no driver: the PyTorch fallback runs, with its one-line warning);
- NCCL itself (the fake group only checks what is handed to it), real streams, events and pinned memory,
  and the fused AdamW kernel (the multi-tensor one runs, as the default picks on CUDA);
- whether a host-to-device copy from pageable memory (each micro-batch, N) makes the host wait for the
  stream, as CUDA may when it stages such a copy: the copies are counted, not timed;
- two ranks' data (rank 0's view of a 2-rank group: the collectives return rank 0's own values);
- anything about time or memory: overlap of the copy stream, allocator fragmentation, real peaks.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_cuda import GRAD_ACCUM, STEPS  # noqa: E402
from fake_cuda_device import preload_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NCCL_DTYPES = {"torch.int8", "torch.uint8", "torch.int32", "torch.int64", "torch.float16", "torch.bfloat16",
               "torch.float32", "torch.float64"}
# Regression bounds, measured on the bundled model with some headroom (raise them only with a reason). A
# forward on fake CUDA dispatched 2,940 ops (2,955 with --offload; dequantize by the PyTorch fallback: on a
# GPU the Triton kernel is one launch per linear); a step of 2 micro-batches 13,224 (the first; the next
# 13,206), 18,580 with --offload and activation checkpointing (each layer's forward once more).
MAX_FORWARD_OPS = 3400
MAX_STEP_OPS = {False: 15000, True: 21000}  # by activation checkpointing
# All-gathers per step, exact: each forward gathers every unit (15: the root's norm, the embedding, 6
# layers x frozen + trainable, lm_head), each backward every unit but the embedding, which has no
# backward, and the root, still gathered (13). Offload and checkpointing add none.
STEP_GATHERS = 2 * (15 + 13)
TRAINABLE_GROUPS = 6  # one per decoder layer: its LoRA tensors
# The code that may work on host tensors in a step ("file:function", or its start), by design: counting
# the labels' target tokens (the batch is on the host until the step copies it) and AdamW's step counters
# (CPU tensors in torch); with --offload the fp32 gradient shards are accumulated, clipped and stepped on
# the host.
HOST_WORK = ("recipe/instruct/loss.py:target_tokens", "recipe/instruct/loss.py:global_targets", "optim/adam")
OFFLOAD_HOST_WORK = (*HOST_WORK, "sharding/flat_group.py:_accumulate", "sharding/state.py:clip_grad_norm_")
LOG_FIELDS = 3  # the log reads loss, grad_norm and targets of each step


@pytest.fixture(scope="session")
def fake_cuda_library() -> str:
    """The compiled fake CUDA library, built once per session in a process of its own (loading it changes
    what torch reports about CUDA)."""
    if shutil.which("c++") is None:
        pytest.skip("the fake CUDA device is compiled: it needs a C++ compiler")
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch has the real device guard and hooks: fake CUDA is for CPU-only builds")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_cuda.py"), "build"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _run(library: str, **options) -> dict:
    env = {**os.environ, **preload_env(library), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_cuda.py"), json.dumps(options)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_on_device(phases: dict, host_work: tuple = ()) -> None:
    """Raise AssertionError naming the first op that saw a tensor off the device, host work outside
    ``host_work``, or a collective NCCL refuses."""
    for name, phase in phases.items():
        assert not phase["wrong"], f"{name}: ops off cuda:0: {phase['wrong']}"
        unexpected = {source: n for source, n in phase["host"].items() if not source.startswith(host_work)}
        assert not unexpected, f"{name}: ops on host tensors: {unexpected}"
        for collective in phase["collectives"]:
            dtype, device = collective.split("@")
            assert device == "cuda:0" and dtype in NCCL_DTYPES, f"{name}: NCCL cannot take a {collective} tensor"


@pytest.mark.parametrize("offload, checkpointing", [(False, False), (True, True)])
def test_gpu_path_on_fake_cuda(fake_cuda_library, offload, checkpointing):
    result = _run(fake_cuda_library, offload=offload, checkpointing=checkpointing, mistakes=False)
    train, steps = result["train"], result["train"]["steps"]
    check_on_device({k: result[k] for k in ("build", "first_forward", "forward", "eval", "adapter")})
    check_on_device({"log": train["logs"][0]})
    check_on_device({"loop": train["loop"], **{f"step {i}": s for i, s in enumerate(steps, 1)}},
                    OFFLOAD_HOST_WORK if offload else HOST_WORK)
    assert result["forward"]["logits"] == "torch.bfloat16@cuda:0"
    assert result["adapter"]["tensors"] == ["torch.float32@cpu"]  # rank 0's full fp32 tensors, for the file
    quantize_syncs = result["build"]["scalar_sources"].get("nf4/quantize.py:quantize", 0)
    assert quantize_syncs <= result["linears"]               # at most one host sync per quantized tensor
    assert result["forward"]["syncs"] == 0                   # no host sync in a forward
    assert result["forward"]["ops"] <= MAX_FORWARD_OPS
    assert result["eval"]["syncs"] <= 2  # one .tolist() of [loss sum, target count] per eval, counted per element

    assert len(steps) == STEPS and len(train["metrics"]) == STEPS
    for step in steps:
        # A step never waits for the GPU, except with offload, whose optimizer steps the host shards: it
        # reads the clipping scale once (a device-to-host copy) and waits for its gradient copies at the
        # end of each backward.
        assert step["sync_sources"] == ({"sharding/state.py:clip_grad_norm_": 1} if offload else {}), step
        assert (step["event_waits"] > 0) == offload
        assert step["ops"] <= MAX_STEP_OPS[checkpointing]
        collectives = step["collective_ops"]
        assert sum(n for op, n in collectives.items() if "allgather" in op) == STEP_GATHERS, collectives
        assert any("reduce_scatter" in op for op in collectives), collectives  # the gradients, on the device
        # Host -> device: each micro-batch's input_ids and labels, and N; with offload also every gathered
        # shard and the clipping's sum of squares. Device -> host: with offload each group's gradient per
        # micro-batch and the clipping scale.
        uploads = 2 * GRAD_ACCUM + 1 + (STEP_GATHERS + 1 if offload else 0)
        downloads = GRAD_ACCUM * TRAINABLE_GROUPS + 1 if offload else 0
        assert step["copies"] == {"cpu->cuda": uploads, **({"cuda->cpu": downloads} if offload else {})}
    # ... and the log, at the last step here (log_every is 10): one .tolist() on a GPU, counted per element
    assert len(train["logs"]) == 1 and train["log_every"] > STEPS
    assert train["logs"][0]["scalar_sources"] == {"recipe/loop.py:to_numbers": LOG_FIELDS * STEPS}
    assert train["loop"]["scalar_sources"] == {"recipe/loop.py:evaluate": 2}  # the last step's evaluation
    assert result["event_waits"] == sum(step["event_waits"] for step in steps)
    assert result["pinned_arenas"] == int(offload)           # offload page-locks one exact arena per rank
    # No GPU driver for Triton: each Triton kernel (dequantize, quantize's reciprocal) falls back to
    # PyTorch with one warning, not one per call
    fallbacks = [w for w in result["warnings"] if "Triton" in w]
    assert bool(fallbacks) == (importlib.util.find_spec("triton") is not None)
    assert len(fallbacks) == len(set(fallbacks)), fallbacks
    assert all(isinstance(json.loads(line)["loss"], float) for line in train["metrics"])


def test_wrong_device_is_caught(fake_cuda_library):
    """The deliberate mistakes (``tests/fake_cuda.py``): a CPU scalar tensor multiplying a decoder layer's
    output in the forward, and one added to a gradient in the backward (torch accepts both; a GPU pays a
    host-to-device copy per call). The checker must name each."""
    result = _run(fake_cuda_library, offload=False, checkpointing=False, mistakes=True)
    with pytest.raises(AssertionError, match=r"forward: ops off cuda:0.*aten::mul.*fake_cuda.py:<lambda>"):
        check_on_device({"forward": result["forward"]})
    step = result["train"]["steps"][0]
    with pytest.raises(AssertionError, match=r"step: ops off cuda:0.*aten::add.*fake_cuda.py:<lambda>"):
        check_on_device({"step": step}, HOST_WORK)
