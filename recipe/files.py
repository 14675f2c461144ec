"""Writing files so that a crash leaves the old version or the new one, never half of one.

The helpers are ``llama.atomic_files``'s (one file: temp + rename; files that belong together: a temporary
directory swapped into place, recovered after a kill between its two renames), shared by llama and recipe;
this module adds what only recipe needs. ``lora/atomic_files.py`` keeps its own copy: lora imports nothing
outside itself, so it can be read and used alone.
"""
from __future__ import annotations

import os
from pathlib import Path

from llama.atomic_files import (atomic_directory, committed_directory, recover, replace_directory, sibling_name,
                                temporary_sibling, write_atomically)

__all__ = ["atomic_directory", "committed_directory", "recover", "replace_directory", "sibling_name",
           "temporary_sibling", "write_atomically", "write_bytes_durably", "write_text_atomically"]


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (before the rename that publishes it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))
