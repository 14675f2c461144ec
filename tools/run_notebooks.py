"""Execute chapter notebooks in place, so they are committed with their outputs.

    python tools/run_notebooks.py notebooks/01_nf4.ipynb [more.ipynb ...]

Runs each notebook top to bottom in a fresh kernel with the notebook's folder as working directory
(as nbmake does in CI) and writes the outputs back into the file. Prints the time each one took.
"""
import sys
import time
from pathlib import Path

import nbclient
import nbformat


def run_in_place(path: Path, timeout_s: int = 900) -> float:
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        notebook, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - start


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        print(f"{name}: executed in {run_in_place(Path(name)):.1f} s")
