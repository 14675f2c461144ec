"""benchmarks.lora --quick runs as a module and prints its table with both sides: ours and PEFT's
(no timing is asserted: the numbers depend on the machine)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reference_libs import reference

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_prints_ours_and_peft_side_by_side():
    reference("bitsandbytes"), reference("peft")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--quick", "--threads", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\([a-d]\) [^|]+?) \| ([^|]+) \|", run.stdout, re.M)}
    for variant in ("(b) ours over bnb Linear4bit", "(c) PEFT over bnb Linear4bit", "(d) nn.Linear, full fine-tune"):
        assert re.fullmatch(r"[\d.]+ \([\d.]+\)", rows[variant]), run.stdout  # fastest (median) ms, both sides present
    assert "(a) ours over nf4.Linear4bit" in rows
    assert "64 tokens, r=4" in run.stdout and "| CPU ms, median | CPU vs (c) |" in run.stdout


@pytest.mark.parametrize("argv, match", [(["--rank", "0"], "--rank: expected an integer >= 1"),
                                         (["--features", "100"], "--features: expected a multiple of 64"),
                                         (["--rank", "512", "--features", "256"], "--rank: expected at most --features")])
def test_bad_flags_are_one_line_errors(argv, match, capsys):
    from benchmarks.lora import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err)
