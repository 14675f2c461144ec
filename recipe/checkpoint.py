"""All-or-nothing training checkpoints, safetensors + JSON only (nothing is ever unpickled).

A checkpoint is a directory ``<out>/checkpoints/step-000040/`` holding, for every rank r:

* ``rank{r}.safetensors``: that rank's local training state as the model gives it
  (``TrainableModel.local_state``: its trainable tensors exactly as the optimizer steps them -- the
  local fp32 master shards under sharding -- and AdamW's moments), plus the torch RNG states (dropout
  masks: the CPU generator, and this rank's GPU's when on CUDA);
* ``rank{r}.json``: the step, the world size, the sampler position (with it, the metrics log is cut back
  to that step on resume) and the run's fingerprint (``recipe/fingerprint.py``).

Saving goes in four phases, each finished by every rank before the next starts (`_on_every_rank`: a
failure on any rank is raised on all of them, none is left waiting): every rank validates and serializes
its part in memory (no file touched yet); rank 0 makes an empty ``step-000040.tmp/``; every rank writes
its two files there (each flushed to disk); rank 0 renames the directory into place
(``recipe.files.replace_directory``) and then replaces the one-line ``latest`` file. ``latest`` is what
makes a checkpoint current, so a failure or a kill at any moment leaves it naming a complete checkpoint:
the previous one or the new one.

Loading checks before it restores anything: each rank's files exist and parse (an error names the
file), the world size and the fingerprint match (each differing setting named with both values).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .files import replace_directory, sibling_name, temporary_sibling, write_bytes_durably, write_text_atomically
from .fingerprint import differences

LATEST = "latest"
RNG_KEYS = ("rng", "cuda_rng")
BOOKKEEPING = ("step", "world_size", "sampler")  # the JSON keys that are not the fingerprint
SAME_KIND = (ValueError, TypeError, FileNotFoundError, OSError)  # another rank's error is re-raised as its kind


def _on_every_rank(action):
    """``action()`` on every rank; when it raises on any rank, raise on every rank (this rank's own error,
    or the first failing rank's, named) instead of leaving the others waiting at the next collective."""
    try:
        result, failure = action(), None
    except Exception as error:
        result, failure = None, error
    failures = [None] * dist.get_world_size()
    kind = None if failure is None else next((k for k in type(failure).__mro__ if k in SAME_KIND), RuntimeError)
    dist.all_gather_object(failures, None if failure is None else (kind.__name__, str(failure)))
    if failure is not None:
        raise failure
    for rank, found in enumerate(failures):
        if found is not None:
            raise {k.__name__: k for k in SAME_KIND}.get(found[0], RuntimeError)(f"rank {rank}: {found[1]}")
    return result


def serialize(state: dict[str, torch.Tensor], meta: dict) -> tuple[bytes, str]:
    """This rank's (safetensors bytes, JSON text); refuses a non-tensor, a non-finite tensor (a diverged run
    has nothing worth resuming) and metadata JSON cannot hold exactly."""
    tensors = {**state, "rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()  # the current device's, as recipe.device sets it
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint state {name!r} must be a tensor, got {type(value).__name__}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"checkpoint state {name!r} has non-finite values (the run diverged); not saved")
    data = safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    return data, json.dumps(meta, indent=1, allow_nan=False) + "\n"


def save(directory: Path, step: int, state: dict[str, torch.Tensor], meta: dict, keep: int = 2) -> Path:
    """Write this rank's ``state`` and ``meta`` as the checkpoint of ``step`` (collective: every rank
    calls it); keep the newest ``keep`` checkpoints up to this one."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (the new checkpoint is always kept), got {keep!r}")
    rank, world = dist.get_rank(), dist.get_world_size()
    directory = Path(directory)
    final = directory / f"step-{step:06d}"
    tmp = sibling_name(final)
    data, text = _on_every_rank(lambda: serialize(state, {**meta, "step": step, "world_size": world}))
    _on_every_rank(lambda: temporary_sibling(final) if rank == 0 else None)
    _on_every_rank(lambda: (write_bytes_durably(tmp / f"rank{rank}.safetensors", data),
                            write_bytes_durably(tmp / f"rank{rank}.json", text.encode())))
    _on_every_rank(lambda: _commit(directory, tmp, final, keep) if rank == 0 else None)
    return final


def _commit(directory: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename the written directory ``tmp`` to ``final``, point ``latest`` at it, remove older checkpoints."""
    replace_directory(tmp, final)
    write_text_atomically(directory / LATEST, final.name + "\n")
    older = sorted(p for p in directory.glob("step-*[0-9]") if p.name <= final.name)
    for old in older[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The complete checkpoint ``latest`` names, or None when there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    found = Path(directory) / pointer.read_text().strip()
    if not found.is_dir():
        raise FileNotFoundError(f"--resume: {pointer} names {found}, which is not there")
    return found


class Checkpoint(NamedTuple):
    state: dict[str, torch.Tensor]  # this rank's local training state, for ``TrainableModel.load_local_state``
    meta: dict                      # the JSON: step, sampler, world size, fingerprint


def read_meta(path: Path) -> dict:
    """A rank's JSON, checked for the bookkeeping keys."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} is missing (was the checkpoint written by fewer ranks?)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--resume: {path} is not valid JSON ({error}); the checkpoint is damaged") from None
    missing = [k for k in BOOKKEEPING if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"--resume: {path} lacks {missing}; the checkpoint is damaged")
    if not isinstance(meta["step"], int) or meta["step"] < 1:
        raise ValueError(f"--resume: {path} has step {meta['step']!r}, expected an integer >= 1")
    return meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A rank's safetensors file, checked to hold the RNG state and only finite floats."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} is missing; the checkpoint is damaged")
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"--resume: {path} is not a readable safetensors file ({error}); the checkpoint is damaged") from None
    if "rng" not in tensors:
        raise ValueError(f"--resume: {path} has no 'rng' tensor; the checkpoint is damaged")
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"--resume: {path} tensor {name!r} has non-finite values; the checkpoint is damaged")
    return tensors


def _read(checkpoint: Path, fingerprint: dict) -> tuple[dict, dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = read_meta(checkpoint / f"rank{rank}.json")
    if meta["world_size"] != world:
        raise ValueError(f"--resume: {checkpoint} was written by {meta['world_size']} ranks, this run has {world}")
    changed = differences({k: v for k, v in meta.items() if k not in BOOKKEEPING}, fingerprint)
    if changed:
        raise ValueError(f"--resume: {checkpoint} was written with other settings: {changed}. "
                         "Resume with the checkpoint's settings, or train into a new --out")
    return meta, read_tensors(checkpoint / f"rank{rank}.safetensors")


def load(checkpoint: Path, fingerprint: dict) -> Checkpoint:
    """Read this rank's part of ``checkpoint`` (collective), refuse it -- on every rank, naming the file or
    each differing setting -- when any rank's part is missing, damaged, of another world size or written
    with another ``fingerprint``; then restore the RNG states."""
    meta, tensors = _on_every_rank(lambda: _read(Path(checkpoint), fingerprint))
    torch.set_rng_state(tensors["rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    return Checkpoint({k: v for k, v in tensors.items() if k not in RNG_KEYS}, meta)
