"""benchmarks/e2e.py in quick mode: both stacks run and the side-by-side tables print (no timing checked)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reference_libs import reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_mode_prints_the_table_with_both_sides(tmp_path):
    for library in ("bitsandbytes", "peft", "transformers"):
        reference(library)
    result = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--quick", "--device", "cpu", "--dtype", "fp32", "--profile",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header = re.search(r"^\| +\| +ours \| +library \| ours/lib \|$", result.stdout, re.M)
    assert header, result.stdout
    rows = {m[1].strip(): (float(m[2]), float(m[3])) for m in
            re.finditer(r"^\| ([^|]+?) +\| +([\d.]+) \| +([\d.]+) \| +[\d.]+x \|$", result.stdout, re.M)}
    assert {"tokens/s (2 ranks)", "CPU ms per step, rank 0", "held-out loss before",
            "held-out loss after 2 steps"} <= set(rows), rows
    assert all(ours > 0 and lib > 0 for ours, lib in rows.values()), rows
    before = rows["held-out loss before"]
    assert before[0] == pytest.approx(before[1], rel=1e-2)  # the same model and data on both sides
    for side in ("ours", "library"):
        assert (tmp_path / side / "adapter" / "adapter_model.safetensors").is_file()
        assert (tmp_path / side / "profile" / "rank1.json").is_file()
    parts = {m[1].strip(): (float(m[2]), float(m[3])) for m in  # --profile: where a step's time goes, both sides
             re.finditer(r"^\| ([a-z:, ]+?) +\| +([\d.]+) \| +([\d.]+) \|$", result.stdout, re.M)}
    assert {"compute", "gather", "reduce", "optimizer", "data", "idle", "step"} <= set(parts), parts
    assert all(sum(side[i] for name, side in parts.items() if name in
                   ("compute", "gather", "reduce", "optimizer", "data", "idle")) == pytest.approx(parts["step"][i], abs=0.5)
               for i in (0, 1)), parts


def test_repeats_combine_as_medians_and_peaks():
    """--repeats: tokens/s and CPU time are the medians of a side's runs, memory its highest peak, the
    losses the first run's; the table shows the per-repeat ratios."""
    from benchmarks.e2e import combined, parse_args, table

    def run(tokens, cpu, rss, loss):
        return {"tokens_per_s": tokens, "cpu_ms_per_step": cpu, "eval_loss_before": 2.0, "eval_loss_after": loss,
                "ranks": [{"peak_rss_mib": rss, "load_peak_rss_mib": 1.0, "at_peak_mib": None}]}

    ours = [run(100, 50, 10, 1.5), run(300, 70, 12, 1.6), run(200, 60, 11, 1.7)]
    side = combined(ours)
    assert (side["tokens_per_s"], side["cpu_ms_per_step"], side["eval_loss_after"]) == (200, 60, 1.5)
    assert side["ranks"][0]["peak_rss_mib"] == 12 and side["ranks"][0]["at_peak_mib"] is None
    assert combined(ours[:1]) is ours[0]
    args = parse_args(["--ranks", "1", "--repeats", "3", "--dtype", "bf16"])
    text = table(args, "cpu", ours, [run(100, 60, 12, 1.5)] * 3)
    assert re.search(r"^\| tokens/s \(1 ranks\) \(median\) +\| +200 \| +100 \| +2\.000x \|$", text, re.M), text
    assert text.endswith("per repeat: 1.000x, 3.000x, 2.000x"), text
