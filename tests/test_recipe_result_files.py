"""The result files of recipe.measure (--json) and recipe.phase_memory are written atomically: a write that
fails half-way leaves the previous file whole."""
import json
from pathlib import Path

import pytest
import torch.distributed

from recipe import job, measure, phase_memory
from recipe import train  # noqa: F401  (imported now: it binds the real run_job, not the stub patched below)
from recipe import device as recipe_device
from recipe.build import DEFAULT_MODEL


def half_then_fail(monkeypatch):
    """Every ``Path.write_text`` writes half of its text, then fails (a full disk)."""
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")
    monkeypatch.setattr(Path, "write_text", write_text)


def write_twice(target: Path, monkeypatch, write) -> None:
    """``write()`` fails half-way: ``target`` keeps its previous text; then succeeds: ``target`` is JSON."""
    target.write_text("previous\n")
    with monkeypatch.context() as failing:
        half_then_fail(failing)
        with pytest.raises(OSError, match="disk full"):
            write()
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary file left
    write()
    json.loads(target.read_text())


def test_measure_json_is_written_atomically(tmp_path, monkeypatch):
    canned = {"ranks": [{"peak_tensor_mib": 1.0, "load_peak_rss_mib": 1.0, "phases": {}}]}
    monkeypatch.setattr(measure, "run", lambda model_dir, out, args: canned)  # no training: only the writing
    target = tmp_path / "result.json"
    write_twice(target, monkeypatch, lambda: measure.main(["--json", str(target)]))
    assert json.loads(target.read_text())["measured_gib"] == [1 / 1024]


def test_phase_peaks_are_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "run_job", lambda config, memory: None)  # no training: only the writing
    monkeypatch.setattr(recipe_device, "init_distributed", lambda device: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    out = tmp_path / "run"
    out.mkdir()
    argv = ["--model", str(DEFAULT_MODEL), "--out", str(out), "--tokenizer", "byte"]
    write_twice(out / "phase_peaks_rank0.json", monkeypatch, lambda: phase_memory.train_with_phase_memory(argv))
