"""A corpus that exists offline on every machine with Python: the standard library's own source.

Files are the ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, in sorted order (deterministic),
EXCLUDING:
  - ``pydoc_data/``: its ``topics.py`` is the English documentation text that the fine-tuning recipe
    uses as a *different* domain, so pretraining must never see it;
  - ``site-packages/`` and ``dist-packages/``: installed third-party code, differs per machine;
  - test suites (``test/``, ``tests/``, ``idle_test/``, ``*_test``): large, repetitive, data-heavy.
Each file goes to the held-out split when the CRC32 of its relative path falls in the last
``holdout_percent`` of 100 buckets (`in_heldout`) -- a property of the name alone, so the split is the
same on any machine that has the file (a Python 3.11 on another machine may hold slightly different
files). `in_heldout` and `windows` are also the fine-tuning corpus's rules (``recipe/data.py``).
"""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

from .tokenizer import ByteTokenizer

EXCLUDED_DIRS = {"pydoc_data", "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_excluded(relative: Path) -> bool:
    return any(part in EXCLUDED_DIRS or part.endswith("_test") for part in relative.parts[:-1])


def in_heldout(name: str, percent: int) -> bool:
    """Whether the document ``name`` belongs to the held-out split: the CRC32 of its name falls in the last
    ``percent`` of 100 buckets (a property of the name alone, the same on every machine)."""
    if not 0 < percent < 100:
        raise ValueError(f"held-out percent must be in 1..99, got {percent}")
    return zlib.crc32(name.encode()) % 100 >= 100 - percent


def stdlib_files(split: str, holdout_percent: int = 5, root: Path | None = None) -> list[Path]:
    """Sorted source files of ``split`` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if is_excluded(relative):
            continue
        if in_heldout(relative.as_posix(), holdout_percent) == (split == "heldout"):
            files.append(path)
    return files


def stdlib_tokens(split: str, holdout_percent: int = 5, root: Path | None = None) -> torch.Tensor:
    """The split as one int16 tensor of byte-tokenizer ids: each file as BOS, its UTF-8 bytes, EOS
    (so the model learns where documents start and end, as the fine-tuning data presents them)."""
    tok = ByteTokenizer()
    chunks = []
    for path in stdlib_files(split, holdout_percent, root):
        data = bytearray(path.read_bytes())
        body = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        chunks += [torch.tensor([tok.bos_token_id]), body, torch.tensor([tok.eos_token_id])]
    return torch.cat([c.to(torch.int16) for c in chunks])


def batches(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """One random batch of windows (batch, seq_len) from a 1-D token tensor, as int64 ids."""
    if data.numel() <= seq_len:
        raise ValueError(f"corpus of {data.numel()} tokens is shorter than seq_len={seq_len}")
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seq_len)`` of a 1-D token stream as int64 ids (the tail that does not
    fill one is dropped); with ``max_windows``, that many evenly spaced ones (deterministic)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be an int >= 1 or None, got {max_windows!r}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"a split of {ids.numel()} tokens is shorter than seq_len={seq_len}")
    cut = ids[: n * seq_len].view(n, seq_len)
    if max_windows is not None and n > max_windows:
        cut = cut[torch.linspace(0, n - 1, max_windows).long()]
    return cut.long()
