"""Execute chapter notebooks in place, so they are committed with their outputs.

    python tools/run_notebooks.py notebooks/01_nf4.ipynb [more.ipynb ...]

Runs each notebook top to bottom in a fresh kernel with the notebook's folder as working directory
(as nbmake does in CI) and writes the outputs back into the file (atomically: a failed run leaves the
notebook as it was). Prints the time each one took.
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: its own llama

from llama.atomic_files import write_atomically  # noqa: E402
from llama.cli import Parser, run_command  # noqa: E402


def run_in_place(path: Path, timeout_s: int = 900) -> float:
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        notebook, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    write_atomically(path, lambda tmp: nbformat.write(notebook, tmp))
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = Parser(prog="python tools/run_notebooks.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="the .ipynb files to execute in place")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if not path.is_file():
            parser.error(f"argument notebooks: {path} is not a file")
    for path in args.notebooks:
        print(f"{path}: executed in {run_in_place(path):.1f} s")


if __name__ == "__main__":
    run_command(main)
