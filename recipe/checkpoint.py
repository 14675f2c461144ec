"""Atomic training checkpoints, safetensors + JSON only (nothing is ever unpickled).

A checkpoint is a directory ``<out>/checkpoints/step-000040/`` holding, for every rank r:

* ``rank{r}.safetensors``: that rank's local training state as the model gives it
  (``TrainableModel.local_state``: its trainable tensors exactly as the optimizer steps them -- the
  local fp32 master shards under sharding -- and AdamW's moments), plus the torch RNG states (dropout
  masks: the CPU generator, and this rank's GPU's when on CUDA);
* ``rank{r}.json``: the step, the sampler position, the world size and a fingerprint of the run.

Writing is atomic at the directory level: every rank writes into ``step-000040.tmp/``, all ranks meet
at a barrier, then rank 0 renames the directory (``recipe.files.replace_directory``) and rewrites the
one-line ``latest`` file (temp file + ``os.replace``). A process killed at any point leaves ``latest``
naming a complete checkpoint: the previous one, or the new one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .files import replace_directory, temporary_sibling, write_text_atomically

LATEST = "latest"
RNG_KEYS = ("rng", "cuda_rng")


def save(directory: Path, step: int, state: dict[str, torch.Tensor], meta: dict, keep: int = 2) -> Path:
    """Write this rank's ``state`` and ``meta`` as the checkpoint of ``step`` (collective: every rank
    calls it); keep the newest ``keep`` checkpoints."""
    rank, world = dist.get_rank(), dist.get_world_size()
    directory = Path(directory)
    final = directory / f"step-{step:06d}"
    if rank == 0:
        temporary_sibling(final)
    dist.barrier()
    tensors = {**state, "rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()  # the current device's, as recipe.device sets it
    tmp = final.with_name(final.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / f"rank{rank}.safetensors"))
    (tmp / f"rank{rank}.json").write_text(json.dumps({**meta, "step": step, "world_size": world}, indent=1))
    dist.barrier()
    if rank == 0:
        replace_directory(tmp, final)
        write_text_atomically(directory / LATEST, final.name + "\n")
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


class Checkpoint(NamedTuple):
    state: dict[str, torch.Tensor]  # this rank's local training state, for ``TrainableModel.load_local_state``
    meta: dict                      # the JSON: step, sampler, world size, fingerprint


def load(checkpoint: Path, fingerprint: dict) -> Checkpoint:
    """Read this rank's part of ``checkpoint`` and restore the RNG states; refuse a checkpoint written by
    another number of ranks or with other settings (``fingerprint``), naming what differs."""
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
    torch.set_rng_state(tensors["rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    return Checkpoint({k: v for k, v in tensors.items() if k not in RNG_KEYS}, meta)
