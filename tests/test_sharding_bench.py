"""benchmarks.sharding --quick on two real ranks (torchrun, gloo): the table prints with both sides,
ours and FSDP2, with prefetch on and off. No timing is asserted (the machine is shared)."""
import os
import subprocess
import sys
from pathlib import Path

from reference_libs import reference

ROOT = Path(__file__).resolve().parent.parent


def test_quick_mode_prints_the_table_with_both_sides():
    reference("torch.distributed.fsdp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "benchmarks.sharding", "--quick"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| (")}
    assert set(rows) == {"(a) ours, prefetch", "(a') ours, no prefetch", "(b) FSDP2, forward prefetch set",
                         "(b') FSDP2 default", "(c) no sharding"}
    for line in rows.values():  # step ms and peak MiB for each of the 2 ranks, then params and optimizer MiB
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert len(cells) == 4 and all(len(c.split(" / ")) == 2 for c in cells[:2]), line
    assert "ours / FSDP2, prefetch on: step time" in run.stdout
    assert "ours / FSDP2, prefetch off: step time" in run.stdout


def test_a_bad_flag_is_one_line_error_and_status_2():
    run = subprocess.run([sys.executable, "-m", "benchmarks.sharding", "--layers", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "error: argument --layers: expected an integer >= 1, got '0'" in run.stderr
    assert "Traceback" not in run.stderr
