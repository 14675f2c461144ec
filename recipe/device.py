"""Where a rank computes: its device, the process-group backend, the default dtype, its memory peaks.

    device = resolve_device("auto")   # cuda:LOCAL_RANK when CUDA is visible, else the CPU
    init_distributed(device)          # NCCL for CUDA tensors, gloo for CPU tensors

The modules the recipe composes take their device from their tensors: ``nf4`` dequantizes with the
Triton kernel on CUDA and with torch on the CPU, ``lora`` creates its adapters beside the base weight,
``sharding`` all-gathers wherever the shards live. So putting a run on a GPU takes three things:

1. the process group: NCCL only reduces CUDA tensors, gloo only CPU ones (this file);
2. each checkpoint tensor moved to the device as it is streamed in, so a linear is quantized on the
   device and only its NF4 form stays there (``recipe/build.py``);
3. each batch moved to the device before the forward (``recipe/loop.py``).

A tensor handed to a collective must live where the backend expects it (``collective_device``), a
one-number count or loss sum included. One rank per GPU: NCCL refuses two ranks on one device.
"""
from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, per_node: int | None = None) -> torch.device:
    """``--device``: cuda (this rank's GPU, ``LOCAL_RANK``), cpu, or auto: CUDA when every process on this
    node can have a GPU of its own (``per_node``, by default torchrun's ``LOCAL_WORLD_SIZE``, <= GPUs
    visible), else the CPU."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        per_node = per_node or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        name = "cuda" if torch.cuda.is_available() and per_node <= torch.cuda.device_count() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= visible:
        raise ValueError(f"--device cuda: local rank {local_rank} needs GPU {local_rank}, but {visible} "
                         f"visible; run at most {visible} processes per node (--nproc_per_node {visible})")
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device) -> None:
    """torchrun's environment, or a one-process group, so the same code runs without torchrun."""
    if dist.is_initialized():
        return
    backend, extra = "gloo", {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend, extra = "nccl", {"device_id": device}
    if "RANK" in os.environ:
        dist.init_process_group(backend, **extra)
    else:
        store = tempfile.NamedTemporaryFile(prefix="home70b-store-", delete=False).name
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, **extra)


def close_distributed() -> None:
    """The end of a torchrun entry (its ``finally:``): collect garbage, then close the process group.

    A sharded model's hooks hold it in reference cycles, and with it the process group and the handles
    of finished async all-gathers. Collected now, while torch.distributed is whole -- left to interpreter
    shutdown, a rank aborted ("terminate called without an active exception") in about 1 run in 4 on a
    loaded CPU. Then the group is closed, as torch.distributed asks."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

def default_dtype(device: torch.device) -> str:
    """bf16 on a GPU that has it and on a CPU that multiplies bf16 natively (x86 AVX512-BF16 or AMX),
    else fp32. Measured on a 2-core AMD EPYC with avx512_bf16 (chapter 7): the default run is 1.16x
    faster in bf16 (5186 vs 4467 tokens/s; 1.56x under heavier load); without native bf16 the CPU
    emulates it."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def collective_device() -> torch.device:
    """Where a tensor handed to a collective of the default group must live."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reset_device_peak(device: torch.device) -> None:
    """Start a new high-water mark of the device's allocated memory (nothing to do on the CPU: see
    ``recipe.memory`` for the CPU's own measures)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_mib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB since the last reset -- what ``recipe.plan`` predicts
    as the allocated peak -- or None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def release_cached_blocks(device: torch.device) -> None:
    """After loading, free what loading left in reference cycles (``gc.collect``: on 2 ranks a whole
    layer's NF4 tensors were found waiting for Python's cyclic collector) and hand the allocator's
    cached blocks back (``torch.cuda.empty_cache``): loading's temporaries (a layer's bf16 weights before
    quantization) were shaped differently from a training step's tensors, so keeping their segments
    would only fragment the memory the step needs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# What a GPU rank keeps free beyond the plan's reserved estimate, on top of what is already in use when
# ``memory_budget`` is asked (the CUDA context and NCCL's communicator buffers: the process group is up,
# and ``init_distributed`` passes ``device_id``, so NCCL connects at init):
HEADROOM = {
    "cuBLAS/cuDNN workspaces": 64 * 2**20,        # 32 MiB per cuBLAS handle on Hopper, a handle per stream
    "kernels loaded on first use": 192 * 2**20,   # CUDA_MODULE_LOADING=LAZY: each library's kernels on first call
    "NCCL buffers set up later": 256 * 2**20,     # NCCL_BUFFSIZE (4 MiB) x channels for algorithms first used in training
}


def memory_budget(device: torch.device, memory_gib: float | None = None) -> int:
    """Bytes one rank may plan for: ``memory_gib`` (``--memory-gib``) if given; on a GPU, the memory
    ``torch.cuda.mem_get_info`` reports free once the process group is up, minus ``HEADROOM`` (512 MiB,
    itemised above: what a training step adds outside the allocator's tensors); on the CPU, this rank's
    share of the available memory (``LOCAL_WORLD_SIZE`` ranks on this node).

    ``recipe.plan`` compares its *reserved* estimate (allocated peak + fragmentation) with this budget.
    Fragmentation is what ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` reduces: the allocator
    then grows one mapped segment per stream instead of caching fixed-size segments, so differently
    sized gathered units, logits and activations reuse the same pages; set it in the environment
    before the first CUDA call (e.g. ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True torchrun ...``).
    The GPU branch (``mem_get_info`` minus ``HEADROOM``) is written but not yet run on a GPU."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ValueError(f"--memory-gib must be > 0, got {memory_gib}")
        return int(memory_gib * 2**30)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(0, free - sum(HEADROOM.values()))
    meminfo = Path("/proc/meminfo")
    available = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                     if line.startswith("MemAvailable")) if meminfo.exists() else 16 * 2**30
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
