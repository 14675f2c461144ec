"""The three teaching modules never import each other; llama imports none of them (ARCHITECTURE.md)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "nf4": {"lora", "sharding", "llama", "recipe"},
    "lora": {"nf4", "sharding", "llama", "recipe"},
    "sharding": {"nf4", "lora", "llama", "recipe"},
    "llama": {"nf4", "lora", "sharding", "recipe"},
}


def imported_top_level_names(path: Path) -> set[str]:
    """Top-level package names of every `import x` / `from x import y` in one file (relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_its_siblings(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offending = {
        str(f.relative_to(ROOT)): sorted(imported_top_level_names(f) & FORBIDDEN[package]) for f in files
    }
    offending = {f: names for f, names in offending.items() if names}
    assert not offending, f"{package} must not import {sorted(FORBIDDEN[package])}; found {offending}"


def test_the_checker_sees_an_import(tmp_path):
    """The check itself can fail: a file that imports a sibling is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom nf4.quantize import quantize\nimport lora.layer as L\n")
    assert imported_top_level_names(bad) == {"torch", "nf4", "lora"}
