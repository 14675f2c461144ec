"""tools/make_instruct_set.py: offline, deterministic (same command, same bytes), held out by module;
and the bundled set it made reads as chat JSONL whose examples fit the bundled model's context."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import llama
from cli_run import assert_one_line, run_as_command
from recipe.instruct import load_instruct

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "recipe" / "instruct" / "data"
sys.path.insert(0, str(ROOT / "tools"))
import make_instruct_set  # noqa: E402


def test_same_command_same_bytes_and_heldout_by_module(tmp_path):
    modules, heldout = ("json", "heapq", "textwrap"), ("heapq",)
    first = make_instruct_set.make(tmp_path / "a", modules, heldout)
    second = make_instruct_set.make(tmp_path / "b", modules, heldout)
    for name in ("train.jsonl", "heldout.jsonl", "manifest.json", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first == second and sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md", "heldout.jsonl", "manifest.json", "train.jsonl"]  # no staging folder left behind
    train, held = ((tmp_path / "a" / f"{s}.jsonl").read_text() for s in ("train", "heldout"))
    assert "heapq." not in train and "json." not in held and "What does heapq.heappush do?" in held
    assert "PSF License" in (tmp_path / "a" / "README.md").read_text()


def test_the_bundled_set_is_what_the_generator_makes():
    manifest = json.loads((BUNDLED / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():  # the files are the ones the manifest describes
        import hashlib
        assert hashlib.sha256((BUNDLED / name).read_bytes()).hexdigest() == digest
    if manifest["python"] == ".".join(platform.python_version_tuple()[:2]):  # docstrings are per version
        out = make_instruct_set.make(Path(__import__("tempfile").mkdtemp()), tuple(manifest["modules"]),
                                     tuple(manifest["heldout_modules"]))
        assert out["sha256"] == manifest["sha256"]
    assert (BUNDLED / "train.jsonl").stat().st_size + (BUNDLED / "heldout.jsonl").stat().st_size < 3_000_000


def test_bundled_examples_are_chat_and_fit_the_tiny_model_with_chatml():
    for split, count in (("train", 1110), ("heldout", 66)):
        data = load_instruct(BUNDLED / f"{split}.jsonl", llama.ByteTokenizer(), None, "chatml", seq_len=256)
        assert data.report() == f"{split}.jsonl: {count} chat examples, template chatml, 0 truncated to 256 tokens, 0 dropped"
    short = load_instruct(BUNDLED / "heldout.jsonl", llama.ByteTokenizer(), None, "llama3", seq_len=128)
    assert short.counts["truncated"] > 0 and all(len(e) <= 128 for e in short.examples)
    fingerprint = short.fingerprint()
    assert fingerprint["template"] == "llama3" and fingerprint["seq_len"] == 128
    assert fingerprint["data_sha256"] == json.loads((BUNDLED / "manifest.json").read_text())["sha256"]["heldout.jsonl"]
    assert fingerprint != data.fingerprint()


def test_an_example_the_template_cannot_render_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"messages": [{"role": "assistant", "content": "a"}]}\n{"messages": [{"role": "user", '
                    '"content": "\\ue000"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(ValueError, match="x.jsonl: example 2: message content contains the reserved characters"):
        load_instruct(path, llama.ByteTokenizer(), None, "chatml")


def test_an_unknown_module_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_instruct_set.py"), "--out", str(tmp_path),
                             "--modules", "json,no_such_module"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == (
        "error: argument --modules: cannot import 'no_such_module' (No module named 'no_such_module')\n")
    assert not any(tmp_path.iterdir())


def test_a_heldout_module_outside_modules_and_an_unwritable_out_are_one_line_errors(tmp_path, capsys):
    assert_one_line(*run_as_command(make_instruct_set.main, ["--out", str(tmp_path), "--modules", "json", "--heldout",
                                                             "heapq"], capsys),
                    "error: argument --heldout: ['heapq'] are not in --modules")
    (tmp_path / "file").write_text("")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_instruct_set.py"), "--out",
                             str(tmp_path / "file" / "out"), "--modules", "json", "--heldout", "json"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr



def test_a_failure_while_the_set_is_put_in_place_leaves_the_previous_set(tmp_path, monkeypatch):
    modules = ("json",)
    make_instruct_set.make(tmp_path / "set", modules, modules)
    (tmp_path / "set" / "NOTES.txt").write_text("kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()}
    real, calls = os.replace, []

    def replace(src, dst):  # whichever files the tool renames, the second rename fails
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full at the second rename")
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        make_instruct_set.make(tmp_path / "set", ("json", "heapq"), modules)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    make_instruct_set.make(tmp_path / "set", ("json", "heapq"), modules)
    assert (tmp_path / "set" / "NOTES.txt").read_text() == "kept"
