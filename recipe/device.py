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

A tensor handed to a collective must live where the backend expects it (``collective_device``), the
scalars ``all_mean`` averages included. One rank per GPU: NCCL refuses two ranks on one device.
"""
from __future__ import annotations

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


def all_mean(value: float) -> float:
    """The mean of a Python number over all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def reset_device_peak(device: torch.device) -> None:
    """Start a new high-water mark of the device's allocated memory (nothing to do on the CPU: see
    ``recipe.memory`` for the CPU's own measures)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_mib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB since the last reset -- what ``recipe.plan`` predicts
    -- or None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def memory_budget(device: torch.device, memory_gib: float | None = None) -> int:
    """Bytes one rank may use: ``memory_gib`` (``--memory-gib``) if given, else its GPU's memory, else its
    share of the CPU's available memory (``LOCAL_WORLD_SIZE`` ranks on this node)."""
    if memory_gib is not None:
        return int(memory_gib * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    meminfo = Path("/proc/meminfo")
    available = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                     if line.startswith("MemAvailable")) if meminfo.exists() else 16 * 2**30
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
