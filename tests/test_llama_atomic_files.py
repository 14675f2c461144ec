"""llama.atomic_files: the one directory swap llama and recipe share, and its recovery after a kill."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import recipe.files
from llama import atomic_files, hf_writer
from llama.atomic_files import atomic_directory, committed_directory, replace_directory, temporary_sibling

ROOT = Path(__file__).resolve().parents[1]

KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from llama.atomic_files import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (Path(tmp) / "a.txt").write_text("old")
real_replace = os.replace
def die(src, dst):  # the first rename (out -> out.old) happened; killed before the second one
    if str(src).endswith(".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = die
with atomic_directory(sys.argv[1]) as tmp:
    (Path(tmp) / "a.txt").write_text("new")
"""


def killed_between_renames(final: Path) -> None:
    result = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(final)], cwd=ROOT,
                            capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert not final.exists() and (final.parent / "out.old").is_dir()  # the state a kill there leaves


def test_a_kill_between_the_renames_leaves_the_previous_set_findable(tmp_path):
    final = tmp_path / "out"
    killed_between_renames(final)
    assert (committed_directory(final) / "a.txt").read_text() == "old"


def test_a_failed_write_after_such_a_kill_leaves_the_previous_set_in_place(tmp_path):
    final = tmp_path / "out"
    killed_between_renames(final)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_write_after_such_a_kill_replaces_the_previous_set_and_leaves_nothing_beside(tmp_path):
    final = tmp_path / "out"
    killed_between_renames(final)
    tmp = temporary_sibling(final)
    (tmp / "a.txt").write_text("newer")
    replace_directory(tmp, final)
    assert (final / "a.txt").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_current_directory_can_be_replaced(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with atomic_directory(".") as tmp:
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "here" / "a.txt").read_text() == "x"


def test_recipe_and_the_hf_writer_use_this_one_implementation():
    for name in ("atomic_directory", "replace_directory", "temporary_sibling", "sibling_name", "write_atomically",
                 "committed_directory", "recover"):
        assert getattr(recipe.files, name) is getattr(atomic_files, name)
    assert hf_writer.atomic_directory is atomic_files.atomic_directory


def test_a_failed_commit_rename_puts_the_previous_set_back(tmp_path, monkeypatch):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    real = os.replace

    def fail_on_the_commit(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("no space")
        real(src, dst)
    monkeypatch.setattr(os, "replace", fail_on_the_commit)
    with pytest.raises(OSError, match="no space"):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
