"""Writing files so that a crash leaves the old version or the new one, never half of one.

One file (`write_atomically`): write a temporary file beside it, then ``os.replace`` it over the target
(a rename within one directory is atomic on POSIX). Files that belong together (a checkpoint, an
adapter): fill a temporary directory beside the target, then swap it into place with two renames::

    with atomic_directory("out/") as tmp:     # out.tmp/, emptied first
        ...write every file into tmp...       # an exception here deletes tmp; out/ is untouched
                                              # on success: out/ -> out.old/, out.tmp/ -> out/, out.old/ removed

A kill between the two renames leaves no ``out/`` and the complete previous set in ``out.old/``:
`committed_directory` says where the last complete set is, and the next write to ``out/`` first puts
it back (`recover`), so a failure of that write, too, leaves the previous set in place. The temporary
names are fixed (every rank of a job knows them without asking): one writer per directory at a time.

``recipe`` uses these (``recipe/files.py``); ``lora/atomic_files.py`` keeps its own copy, because lora
imports nothing outside itself.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` (readable by
    all: safetensors and ``mkstemp`` create owner-only files, and a checkpoint is meant to be shared)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _absolute(directory: str | Path) -> Path:
    """``directory`` made absolute without following links, so "." and "x/.." have a name and a parent."""
    return Path(os.path.abspath(directory))


def sibling_name(directory: str | Path) -> Path:
    """The temporary directory that `temporary_sibling` makes for ``directory``: ``<name>.tmp`` beside it."""
    directory = _absolute(directory)
    return directory.with_name(directory.name + ".tmp")


def previous_name(directory: str | Path) -> Path:
    """Where `replace_directory` keeps the previous set during the swap: ``<name>.old`` beside it."""
    directory = _absolute(directory)
    return directory.with_name(directory.name + ".old")


def committed_directory(directory: str | Path) -> Path:
    """Where the last complete set written to ``directory`` is: ``directory`` itself or, when a write was
    killed between its two renames, ``<name>.old`` (when neither exists: ``directory``)."""
    directory, previous = _absolute(directory), previous_name(directory)
    return previous if not directory.exists() and previous.is_dir() else directory


def recover(directory: str | Path) -> None:
    """Finish what a write killed during the swap left: the previous set goes back when the new one never
    arrived (killed between the renames), and is dropped when the new one is in place."""
    directory, previous = _absolute(directory), previous_name(directory)
    if previous.is_dir():
        if directory.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, directory)


def temporary_sibling(directory: str | Path) -> Path:
    """An empty directory beside ``directory`` to fill before `replace_directory` (any leftover removed;
    what a killed earlier write left is recovered first)."""
    recover(directory)
    tmp = sibling_name(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_directory(tmp: str | Path, final: str | Path) -> None:
    """Put the complete directory ``tmp`` at ``final``: the previous ``final`` is renamed aside first and
    removed after, so at every moment `committed_directory(final)` holds the old set or the new one."""
    tmp, final, previous = _absolute(tmp), _absolute(final), previous_name(final)
    recover(final)
    try:
        if final.exists():
            os.replace(final, previous)
        os.replace(tmp, final)
    except BaseException:
        recover(final)  # a failed second rename: the previous set goes back
        raise
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty `temporary_sibling` of ``path``; on success it replaces ``path`` (`replace_directory`);
    on an exception, in the block or in the renames, it is deleted and ``path`` is left as it was."""
    tmp = temporary_sibling(path)
    try:
        yield tmp
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place


def link_other_files(old: str | Path, new: str | Path, replaced: Callable[[str], bool]) -> None:
    """Bring the entries of directory ``old`` for which ``replaced(name)`` is false into ``new`` (files
    hard-linked, or copied where links are not possible; subdirectories likewise), with ``old``'s mode."""
    old, new = Path(old), Path(new)
    if not old.is_dir():
        return
    shutil.copymode(old, new)
    for entry in old.iterdir():
        if replaced(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst, follow_symlinks=False)
