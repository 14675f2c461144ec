"""Write a set of files that belong together all-or-nothing: a reader sees the old set or the new one.

Replacing files one by one is not enough: a crash between two replacements leaves new weights beside an
old config, a set that never existed. `write_files_atomically` instead builds the whole new directory
beside the old one and swaps the two with renames (a rename within one file system is atomic on POSIX)::

    1. <parent>/.<name>.writing/   every file written and fsync'ed (plus the old directory's other files)
    2. <name>/  ->  .<name>.previous/      rename 1 (skipped when there is no old directory)
    3. .<name>.writing/  ->  <name>/       rename 2: the commit point
    4. .<name>.previous/ removed

A failure at any step before rename 2 puts the old directory back; after rename 2 the new set is in
place. A *kill* leaves one of these states on disk, and `committed_directory` says where the last complete
set is: ``<name>/`` when it exists; otherwise, killed between the two renames, ``.<name>.previous/``.
The next write to the same directory first finishes or undoes what a killed one left (`recover`).

One writer per directory at a time (in training, rank 0): two concurrent writers would share the hidden
sibling names.
"""
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

FileData = bytes | bytearray | memoryview | Callable[[Path], None]


def _siblings(directory: Path) -> tuple[Path, Path]:
    """(the staging directory being written, the previous set during the swap)."""
    return directory.parent / f".{directory.name}.writing", directory.parent / f".{directory.name}.previous"


def _as_directory(directory, caller: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{caller}: directory must be a str or os.PathLike; got {type(directory).__name__}")
    directory = Path(directory)
    if directory.name in ("", ".", "..") and caller == "committed_directory":  # reading "." is fine
        directory = directory.resolve()
    if directory.name in ("", ".", ".."):
        raise ValueError(f"{caller}: directory must name a directory of its own (not {str(directory)!r}); "
                         f"its parent receives the hidden staging directory")
    return directory


def committed_directory(directory: str | os.PathLike) -> Path:
    """Where the last complete set written to ``directory`` is: ``directory`` itself, or, when a write was
    killed between its two renames, the hidden sibling ``.<name>.previous`` that holds the previous set.
    (When neither exists, ``directory``: nothing was ever committed there, and reading it fails as usual.)"""
    directory = _as_directory(directory, "committed_directory")
    _, previous = _siblings(directory)
    return previous if not directory.exists() and previous.is_dir() else directory


def recover(directory: str | os.PathLike) -> None:
    """Finish or undo what an interrupted write to ``directory`` left: drop a staging directory; after a
    kill between the renames, move the previous set back; after a kill past the commit, drop it."""
    directory = _as_directory(directory, "recover")
    staging, previous = _siblings(directory)
    if previous.is_dir():
        if directory.exists():
            shutil.rmtree(previous)
        else:
            os.rename(previous, directory)
    if staging.exists():
        shutil.rmtree(staging)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') bytes to the disk, so a power cut cannot undo a rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the renames stay atomic regardless
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: FileData) -> None:
    if callable(data):
        data(path)
    else:
        path.write_bytes(data)
    _fsync(path)


def _check(directory: Path, files: Mapping[str, FileData]) -> None:
    if not isinstance(files, Mapping) or not files:
        raise TypeError(f"write_files_atomically: files must be a non-empty dict {{file name: bytes}}; got {files!r:.80}")
    for name, data in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"write_files_atomically: file name {name!r} must be a plain file name (no directories)")
        if not (isinstance(data, (bytes, bytearray, memoryview)) or callable(data)):
            raise TypeError(f"write_files_atomically: files[{name!r}] must be bytes or a callable(path) that writes "
                            f"the file; got {type(data).__name__}")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"write_files_atomically: {directory} exists and is not a directory")
    if directory.is_dir():
        nested = sorted(p.name for p in directory.iterdir() if p.is_dir())
        if nested:
            raise ValueError(f"write_files_atomically: {directory} holds subdirectories {nested}; the directory is "
                             f"replaced as a whole and only its files are carried over -- use a directory of its own")


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """One file: call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_files_atomically(directory: str | os.PathLike, files: Mapping[str, FileData]) -> Path:
    """Make ``directory`` hold ``files`` ({file name: content}) all-or-nothing; return the directory.

    Each content is the file's ``bytes`` (serialize and validate everything *before* calling, e.g.
    ``safetensors.torch.save(tensors)``, ``json.dumps(config).encode()``), or a callable ``write(path)``
    that writes the file (for a payload too big to hold twice in memory). Files already in ``directory``
    that ``files`` does not name are kept (hard-linked, or copied, into the new set); a directory holding
    subdirectories is refused. The parent directory is created when missing.

    Guarantee: whatever fails or is killed, ``committed_directory(directory)`` holds either the complete
    previous set or the complete new one (module docstring: the steps and the states a kill can leave).
    """
    directory = _as_directory(directory, "write_files_atomically")
    _check(directory, files)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    staging, previous = _siblings(directory)
    try:
        staging.mkdir()
        for name, data in files.items():
            _write_file(staging / name, data)
        if directory.is_dir():
            _carry_over(directory, staging, files)
        _fsync(staging)
        if directory.exists():
            os.rename(directory, previous)
        os.rename(staging, directory)
        _fsync(directory.parent)
    except BaseException:
        recover(directory)  # before the commit: the previous set goes back; after it: the new one stays
        raise
    recover(directory)  # drop the previous set
    return directory


def _carry_over(directory: Path, staging: Path, files: Mapping[str, FileData]) -> None:
    """Bring the old directory's other files (and its permissions) into the new set."""
    shutil.copymode(directory, staging)
    for path in directory.iterdir():
        if path.name not in files:
            try:
                os.link(path, staging / path.name)
            except OSError:  # a file system without hard links
                shutil.copy2(path, staging / path.name)
