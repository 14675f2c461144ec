"""What a checkpoint must share with the run that resumes it, and the error naming what differs.

    fp = of_job(config, model_config)     # {"build.dora": False, "seq_len": 128, "data.files.a.txt": [...], ...}
    differences(saved_fp, fp)             # "build.dora: False in the checkpoint, True now; ..."

The fingerprint is built from the fields of ``recipe.job.JobConfig`` (its ``BuildOptions`` and
``LoopConfig`` included), walked generically: every field is part of it unless `MAY_CHANGE` lists it,
so an option added later is checked without anyone remembering to add it here. Two fields are replaced
by what they point to: ``build.model`` by the model's identity (its ``config.json`` fields and the sizes
of the checkpoint's files: a moved directory still matches, another model does not) and ``data`` by the
size and SHA-256 of every data file (the same path holding other text does not match). Nested values are
flattened into dotted keys, so a difference is reported setting by setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

import llama

# Fields that change neither the shapes of the saved state nor the numbers a step computes: a resumed run
# may set them differently (write elsewhere, evaluate or save at another rhythm, move to another device,
# recompute activations, offload, profile, answer more or fewer held-out questions greedily).
MAY_CHANGE = frozenset({"loop.out", "loop.progress", "loop.eval_every", "loop.save_every", "resume", "memory_gib",
                        "track_memory", "eval_batches", "activation_checkpointing", "build.offload", "build.device",
                        "profile", "samples"})


def model_identity(model: str | Path, config: llama.LlamaConfig) -> dict:
    """The model's config fields and the byte size of each of its files."""
    files = sorted(p for p in Path(model).iterdir() if p.is_file())
    return {"config": dataclasses.asdict(config), "files": {p.name: p.stat().st_size for p in files}}


def files_identity(data) -> dict | str | None:
    """``{name: [size, sha256]}`` of the data file or of every file under the data directory; any other
    value of ``data`` (None, a corpus name) as it is."""
    path = Path(data) if data is not None else None
    if path is None or not path.exists():
        return data
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"files": {(p.relative_to(path).as_posix() if path.is_dir() else p.name):
                      [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()] for p in files}}


def _plain(value):
    """A JSON value for ``value`` (paths, dtypes and devices as text, tuples as lists)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _flatten(key: str, value, into: dict, identities: dict) -> None:
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for name, item in value.items():
            child = f"{key}.{name}" if key else name
            if child not in MAY_CHANGE:
                _flatten(child, identities[child](item) if child in identities else item, into, identities)
    else:
        into[key] = _plain(value)


def flat(value: dict) -> dict:
    """A nested dict as ``{dotted key: JSON value}``."""
    into = {}
    _flatten("", value, into, {})
    return into


def of_job(config, model_config: llama.LlamaConfig) -> dict:
    """The flat fingerprint of a ``JobConfig`` whose model has ``model_config``: ``{dotted field: JSON value}``."""
    into = {}
    _flatten("", config, into, {"build.model": lambda model: model_identity(model, model_config),
                                "data": files_identity})
    return into


def differences(saved: dict, now: dict) -> str:
    """``""`` when ``saved`` and ``now`` agree, else each differing (dotted) key with its two values."""
    saved, now, absent = flat(saved), flat(now), "(absent)"
    changed = [f"{key}: {saved.get(key, absent)!r} in the checkpoint, {now.get(key, absent)!r} now"
               for key in sorted(set(saved) | set(now)) if saved.get(key, absent) != now.get(key, absent)]
    return "; ".join(changed)
