"""benchmarks/nf4.py and benchmarks/quant_quality.py in --quick mode: each prints its table with both sides
(ours and bitsandbytes) present. No timing is asserted: only that the benchmarks run and report."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from reference_libs import reference

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def row(table: str, name: str) -> list[str]:
    """The cells of the first table row whose name starts with ``name``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(name):
            return cells
    raise AssertionError(f"no row {name!r} in:\n{table}")


NUMBER = re.compile(r"^[\d,]+(\.\d+)?(e-?\d+)?$")


def test_nf4_benchmark_quick_prints_both_sides():
    reference("bitsandbytes")
    result = run_module("benchmarks.nf4", "--quick", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("quantize", "dequantize 256x1024 (PyTorch fast path) into out=", "dequantize 256x1024, allocating",
                 "dequantize 128x512 (PyTorch fast path) into out=", "dequantize 128x512, allocating",
                 "256x1024: memory floor", "128x512: memory floor", "MSE on N(0,1), NF4", "bits / parameter"):
        ours, theirs = row(out, name)[1:3]
        assert NUMBER.match(ours) and NUMBER.match(theirs), (name, ours, theirs)
    for shape in ("256x1024", "128x512"):
        assert row(out, f"{shape}: time / memory floor")[3] == "x floor"
        for name in ("CPU ms per call", "page faults per call"):  # ours: "into out=; allocating", then theirs
            ours, theirs = row(out, f"{shape}: {name}")[1:3]
            assert all(NUMBER.match(x.strip()) for x in ours.split(";")) and NUMBER.match(theirs), (name, ours, theirs)
    assert row(out, "rounding rule vs bitsandbytes' CPU backend")[1:3] == ["cpu", "CPU backend"]
    for name in ("NF4 codes", "double-quant absmax (8-bit codes)", "nested absmax", "offset"):
        cells = row(out, f"identical bytes: {name}")
        assert cells[1] == "yes" and cells[2].startswith("0 of "), cells
    assert row(out, "identical dequantized values")[1] == "yes"
    nf4_changed, absmax_changed = row(out, "cuda rule instead: NF4; 8-bit absmax bytes changed")[1].split("; ")
    assert nf4_changed.isdigit() and absmax_changed.isdigit()
    assert NUMBER.match(row(out, "MSE on N(0,1), Int4 absmax")[1])


def test_nf4_benchmark_bad_flag_is_one_line_error():
    result = run_module("benchmarks.nf4", "--repeats", "0", timeout=300)
    assert result.returncode == 2 and "error: argument --repeats: expected an integer >= 1, got '0'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_quant_quality_quick_prints_ours_and_bitsandbytes():
    reference("bitsandbytes")
    result = run_module("benchmarks.quant_quality", "--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    losses = {name: float(row(result.stdout, name)[1]) for name in
              ("bf16", "NF4 (ours)", "NF4 (bnb)", "FP4 (bnb)", "Int4 absmax")}
    assert abs(losses["NF4 (ours)"] - losses["NF4 (bnb)"]) < 0.01, losses


def test_quant_quality_bad_windows_is_one_line_error():
    result = run_module("benchmarks.quant_quality", "--windows", "0", timeout=300)
    assert result.returncode == 2 and "error: argument --windows: expected an integer >= 1, got '0'" in result.stderr
    assert "Traceback" not in result.stderr
