"""Make the bundled instruction set: short questions about Python's standard library, answered from its
own documentation, in the chat JSONL format (``{"messages": [...]}``), offline and deterministic.

    python tools/make_instruct_set.py [--out recipe/instruct/data] [--modules json,heapq] [--heldout heapq]

For every public function of each module (``__all__``, else its public names, defined in that module
or its C accelerator ``_name``), and every public method of the built-in types ``str``, ``bytes``,
``list``, ``dict``, ``set``, ``int`` and ``float`` (named ``str.split``, and ``len`` for ``builtins.len``):

- "What does M.f do?"              -> the first sentence of its docstring (RST ``literals`` unquoted);
- "What is the signature of M.f?"  -> ``M.f(args)`` from ``inspect.signature``;
- one conversation with both turns ("And its signature?") when they are short together;

plus "What is the M module for?" from the module's docstring, and "What is the Python "X" statement
for?" from the ``help("X")`` topics of ``pydoc_data/topics.py`` (``recipe.data.load_documents``, as the
main job reads them: a dict literal, nothing unpickled). Answers longer than ``MAX_ANSWER`` characters are left out, so an example
fits the bundled model's 256-token context with a template. The held-out split is by module: every
question about a ``--heldout`` module (and no other) goes to ``heldout.jsonl``.

Same command on the same Python version, same bytes: names are visited in sorted order and nothing
depends on the machine (no paths, no dates). Docstrings change between Python versions, so
``manifest.json`` records the version the set was made with. The text is from the Python
documentation, under the PSF License Agreement (https://docs.python.org/3/license.html); ``README.md``
beside the files says so. The files are written all-or-nothing: into a temporary folder beside ``--out``
that then replaces it (a failure or a kill leaves the old set or the new one, never a mix).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: its own llama and recipe

from llama.atomic_files import atomic_directory, link_other_files  # noqa: E402
from llama.cli import Parser, run_command  # noqa: E402
from recipe.data import load_documents  # noqa: E402

MODULES = ("builtins", "base64", "binascii", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "fnmatch", "fractions",
           "functools", "glob", "gzip", "heapq", "html", "json", "keyword", "math", "operator", "pprint", "random",
           "re", "secrets", "shlex", "statistics", "string", "struct", "tempfile", "textwrap", "unicodedata",
           "urllib.parse", "uuid", "warnings", "zlib")
TYPES = (str, bytes, list, dict, set, int, float)
HELDOUT = ("calendar", "colorsys", "heapq", "shlex", "textwrap")
STATEMENTS = ("assert", "break", "class", "continue", "del", "for", "global", "if", "import", "nonlocal", "pass",
              "raise", "return", "try", "while", "with")
MAX_ANSWER, MAX_TWO_ANSWERS = 140, 90  # characters; with a ChatML template, at most ~250 tokens of bytes
LICENCE = """# The bundled instruction set

`train.jsonl` and `heldout.jsonl`: questions about Python's standard library in the chat JSONL format
(`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`), made by `tools/make_instruct_set.py`
from the docstrings and `pydoc` topics of Python {version} (`manifest.json` lists the modules, the held-out
ones, the counts and the files' SHA-256).

The answers are text of the Python documentation, Copyright (c) 2001 Python Software Foundation; All Rights
Reserved, used under the PSF License Agreement for Python (https://docs.python.org/3/license.html).
"""


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first prose paragraph, whitespace collapsed, or None if too long."""
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc or "")):
        text = " ".join(paragraph.split()).replace("``", "")
        if not text or "::=" in text or re.match(r"^[\w.]+\(.*\)( -> .*|-->.*)?$", text):  # grammar, signature
            continue
        sentence = re.split(r"(?<!\b\w\.)(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(":")  # not after a.k.a./e.g.
        sentence = sentence if sentence.endswith((".", "!", "?")) else sentence + "."
        return sentence if len(sentence) <= MAX_ANSWER else None
    return None


def chat(*turns: str) -> dict:
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]}


def public_functions(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    homes = {module.__name__, "_" + module.__name__.rsplit(".", 1)[-1]}
    found = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if (inspect.isfunction(obj) or inspect.isbuiltin(obj)) and getattr(obj, "__module__", None) in homes:
            found.append((name, obj))
    return found


def signature(obj) -> str | None:
    """``(args)``, or None when there is none or a default's repr holds a memory address (``<function f at 0x..>``)."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    return None if " at 0x" in text else text


def routine_examples(qualified: str, obj) -> list[dict]:
    """What it does, its signature, and both in one conversation when short enough."""
    summary, args = first_sentence(obj.__doc__), signature(obj)
    call = qualified + args if args and len(qualified + args) <= MAX_ANSWER else None
    examples = [chat(f"What does {qualified} do?", summary)] if summary else []
    if call:
        examples.append(chat(f"What is the signature of {qualified}?", call))
    if summary and call and len(summary) + len(call) <= MAX_TWO_ANSWERS:
        examples.append(chat(f"What does {qualified} do?", summary, "And its signature?", call))
    return examples


def module_examples(module_name: str) -> list[dict]:
    module = importlib.import_module(module_name)
    purpose = first_sentence(module.__doc__)
    examples = [chat(f"What is the {module_name} module for?", purpose)] if purpose and module_name != "builtins" else []
    for name, obj in public_functions(module):
        examples += routine_examples(f"{module_name}.{name}" if module_name != "builtins" else name, obj)
    return examples


def method_examples() -> list[dict]:
    """The public methods of the built-in types (``str.split``, ``dict.get``, ...)."""
    examples = []
    for owner in TYPES:
        for name in sorted(vars(owner)):
            if not name.startswith("_") and inspect.isroutine(vars(owner)[name]):
                examples += routine_examples(f"{owner.__name__}.{name}", getattr(owner, name))
    return examples


def statement_examples() -> list[dict]:
    topics = load_documents(None)  # the pydoc topics, as the main job reads them
    examples = []
    for keyword in STATEMENTS:
        body = topics[keyword].split("\n\n", 1)[1]  # drop the underlined title
        answer = first_sentence(body)
        if answer:
            examples.append(chat(f'What is the Python "{keyword}" statement for?', answer))
    return examples


def jsonl(examples: list[dict]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode("utf-8")


def make(out: Path, modules: tuple[str, ...], heldout: tuple[str, ...]) -> dict:
    """Write train.jsonl, heldout.jsonl, manifest.json and README.md into ``out``, all-or-nothing
    (``llama.atomic_files.atomic_directory``; other files in ``out`` are kept)."""
    splits = {"train": statement_examples() + method_examples(), "heldout": []}
    for name in modules:
        splits["heldout" if name in heldout else "train"] += module_examples(name)
    files = {f"{split}.jsonl": jsonl(examples) for split, examples in splits.items()}
    version = platform.python_version_tuple()[:2]
    manifest = {"python": ".".join(version), "modules": list(modules), "heldout_modules": list(heldout),
                "examples": {split: len(examples) for split, examples in splits.items()},
                "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
                "licence": "PSF License Agreement for Python (https://docs.python.org/3/license.html)"}
    files["manifest.json"] = (json.dumps(manifest, indent=1) + "\n").encode()
    files["README.md"] = LICENCE.replace("{version}", ".".join(version)).encode()
    with atomic_directory(out) as staging:
        link_other_files(out, staging, replaced=files.__contains__)
        for name, data in files.items():
            (staging / name).write_bytes(data)
    return manifest


def main(argv=None) -> dict:
    parser = Parser(prog="python tools/make_instruct_set.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "recipe" / "instruct" / "data")
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated standard-library modules")
    parser.add_argument("--heldout", default=",".join(HELDOUT), help="the modules whose questions are held out")
    args = parser.parse_args(argv)
    modules, heldout = tuple(args.modules.split(",")), tuple(args.heldout.split(","))
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            parser.error(f"argument --modules: cannot import {name!r} ({err})")
    if not set(heldout) <= set(modules):
        parser.error(f"argument --heldout: {sorted(set(heldout) - set(modules))} are not in --modules")
    manifest = make(args.out, modules, heldout)
    print(f"{manifest['examples']} examples from Python {manifest['python']} written to {args.out}")
    return manifest


if __name__ == "__main__":
    run_command(main)
