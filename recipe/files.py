"""Writing files so that a crash leaves the old version or the new one, never half of one.

One file: write a temporary file beside it, then ``os.replace`` it over the target (a rename within one
directory is atomic on POSIX). Files that belong together (a checkpoint, an adapter): write them into a
temporary directory, then rename the directory into place (`replace_directory`).

``lora/atomic_files.py`` keeps its own copies (`write_atomically`, and `write_files_atomically` for a
directory): lora imports nothing outside itself, so it can be read and used alone. ``llama`` sits below
``recipe`` and keeps its own too (``llama.checkpoint.write_atomically``, ``llama.hf_writer.atomic_directory``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (before the rename that publishes it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def sibling_name(directory: Path) -> Path:
    """The path of `temporary_sibling`'s directory for ``directory`` (known to every rank without asking)."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".tmp")


def temporary_sibling(directory: Path) -> Path:
    """An empty directory beside ``directory`` to fill before `replace_directory` (any leftover removed)."""
    tmp = sibling_name(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_directory(tmp: Path, final: Path) -> None:
    """Put the complete directory ``tmp`` at ``final``: the previous ``final`` is moved aside first and
    removed after, so at every moment ``final`` is absent, the old directory or the new one."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
