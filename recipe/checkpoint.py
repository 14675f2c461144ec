"""Atomic training checkpoints, safetensors + JSON only (nothing is ever unpickled).

A checkpoint is a directory ``<out>/checkpoints/step-000040/`` holding, for every rank r:

* ``rank{r}.safetensors``: that rank's trainable tensors exactly as the optimizer steps them (the local
  fp32 master shards under sharding: the adapter, sharded), AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step``
  for each, and the torch RNG states (dropout masks: the CPU generator, and this rank's GPU's when on CUDA);
* ``rank{r}.json``: the step, the sampler position, the world size and a fingerprint of the run.

Writing is atomic at the directory level: every rank writes into ``step-000040.tmp/``, all ranks meet
at a barrier, then rank 0 renames the directory (``os.replace``) and rewrites the one-line ``latest``
file (temp file + ``os.replace``). A process killed at any point leaves ``latest`` naming a complete
checkpoint: the previous one, or the new one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2) local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(directory: Path, step: int, params: list, optimizer: torch.optim.Optimizer, meta: dict,
         keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` (collective: every rank calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    directory = Path(directory)
    final, tmp = directory / f"step-{step:06d}", directory / f"step-{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()  # the current device's, as recipe.device sets it
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = _local(p.detach())
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"{key}.{i}"] = _local(state[key]).reshape(-1) if key == "step" else _local(state[key])
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(tmp / f"rank{rank}.safetensors"))
    (tmp / f"rank{rank}.json").write_text(json.dumps({**meta, "step": step, "world_size": world}, indent=1))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_text_atomically(directory / LATEST, final.name + "\n")
        for old in sorted(directory.glob("step-*[0-9]"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest(directory: Path) -> Path | None:
    """The complete checkpoint ``latest`` names, or None when there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    return Path(directory) / pointer.read_text().strip()


def load(checkpoint: Path, params: list, optimizer: torch.optim.Optimizer, fingerprint: dict) -> dict:
    """Restore this rank's tensors, optimizer state and RNG from ``checkpoint``; return its JSON meta."""
    rank, world = dist.get_rank(), dist.get_world_size()
    meta_path = Path(checkpoint) / f"rank{rank}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"--resume: {meta_path} is missing (was the run saved with fewer ranks?)")
    meta = json.loads(meta_path.read_text())
    if meta["world_size"] != world:
        raise ValueError(f"--resume: checkpoint was written by {meta['world_size']} ranks, this run has {world}")
    changed = {k: (meta.get(k), v) for k, v in fingerprint.items() if meta.get(k) != v}
    if changed:
        raise ValueError(f"--resume: the run's settings differ from the checkpoint's: {changed}")
    tensors = load_file(str(Path(checkpoint) / f"rank{rank}.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(params):
            _local(p).copy_(tensors[f"param.{i}"])
            if f"exp_avg.{i}" in tensors:
                device = _local(p).device
                like = (lambda t: type(p).from_local(t.to(device), p.device_mesh, p.placements)) \
                    if hasattr(p, "to_local") else (lambda t: t.to(device))
                optimizer.state[p] = {"step": tensors[f"step.{i}"].reshape(()).clone(),
                                      "exp_avg": like(tensors[f"exp_avg.{i}"]),
                                      "exp_avg_sq": like(tensors[f"exp_avg_sq.{i}"])}
    torch.set_rng_state(tensors["rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    return meta
