"""tools/run_notebooks.py: a user error is one line and exit status 2; the notebook is rewritten atomically."""
import subprocess
import sys
from pathlib import Path

from reference_libs import reference

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import run_notebooks  # noqa: E402


def test_run_notebooks_without_a_notebook_or_with_a_missing_one_is_a_one_line_error(tmp_path):
    for argv in ([], [str(tmp_path / "missing.ipynb")]):
        result = subprocess.run([sys.executable, str(ROOT / "tools" / "run_notebooks.py"), *argv],
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result


def test_a_notebook_is_executed_and_written_back_in_place(tmp_path):
    nbformat = reference("nbformat")
    reference("nbclient")
    path = tmp_path / "n.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")]), str(path))
    run_notebooks.main([str(path)])
    assert nbformat.read(path, as_version=4).cells[0].outputs[0]["text"] == "42\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.ipynb"]
