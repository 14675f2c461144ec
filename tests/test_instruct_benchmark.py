"""benchmarks/packing.py --quick prints its table with the three batchings and less padding when packed."""
import re

from benchmarks import packing


def test_packing_benchmark_quick_prints_packing_and_padding(capsys):
    packing.main(["--quick"])
    out = capsys.readouterr().out
    rows = {m[0]: float(m[1]) for m in re.findall(r"^\| (\([abc]\)[^|]*?) \| \d+ \| \d+ \| ([\d.]+)% \|", out, re.M)}
    assert set(rows) == {"(a) packing", "(b) padding", "(c) padding, length-sorted"}, out
    assert rows["(a) packing"] < rows["(b) padding"] and "1.00x" in out
