"""What every command of the project does on bad input and how it shows progress.

    parser = cli.Parser(prog="python -m recipe.train")         # adds --debug
    parser.add_argument("--steps", type=cli.integer(minimum=1), default=300)
    parser.add_argument("--lr", type=cli.number(above=0), default=3e-3)
    cli.run_command(main)                                       # main(argv) -> whatever

**User errors.** A bad flag value is refused while parsing, before any model loads; argparse names
the flag (``error: argument --steps: expected an integer >= 1, got '0'``). A user error later on is
one line ``error: ...`` on stderr and exit status 2, printed by rank 0 only under torchrun (every
rank fails alike; the others exit with status 2 silently). ``--debug`` shows the traceback instead.

Which exceptions are user errors is a rule, not a list of tolerated crashes (`is_user_error`):
the project reports bad input with a ``ValueError``/``TypeError``/``ImportError`` whose message names
the argument, the value and what is expected, so such an exception counts when a ``raise`` statement
of the project's own code raised it; an ``OSError`` (missing file, permission, full disk) always
counts, its message names the path. The same exception types raised inside torch or the standard
library -- or by a wrong call in our code -- are bugs or unchecked inputs: they keep their traceback.

**Progress.** On a terminal, a tqdm bar; when the output goes to a file or a pipe (CI, ``nohup``),
one plain line every ``every`` steps instead of a bar redrawn into the log (`progress`).

This lives in ``llama`` -- the lowest layer that has a command (``llama.pretrain``) -- so that every
command, ``recipe``'s and the benchmarks' included, shares this one copy without ``llama`` importing
anything above it.
"""
from __future__ import annotations

import argparse
import dis
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

PROJECT_PACKAGES = ("nf4", "lora", "sharding", "llama", "recipe", "benchmarks")
ROOT = Path(__file__).resolve().parents[1]


def rank() -> int:
    """This process's rank: the process group's when one is up, torchrun's ``RANK`` before that."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr (rank 0 only) and exit with status 2."""
    if rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with ``--debug``, whose errors are the single line ``error: ...`` and exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of a user error")

    def error(self, message: str) -> NoReturn:
        fail(message)


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[minimum, maximum]`` (either bound optional)."""
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (
        f" <= {maximum}" if maximum is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected
    return parse


def number(minimum: float | None = None, above: float | None = None, below: float | None = None,
           maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite float, ``>= minimum``, ``> above``, ``< below``, ``<= maximum`` (each
    optional)."""
    bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
              f"< {below}" if below is not None else "", f"<= {maximum}" if maximum is not None else ""]
    expected = " and ".join(["a finite number"] + [b for b in bounds if b]).replace(" and ", " ", 1)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or (
                above is not None and value <= above) or (below is not None and value >= below) or (
                maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected
    return parse


def _raised_by_project(error: BaseException) -> bool:
    """True when the innermost frame of ``error`` is a ``raise`` statement in the project's packages."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    try:
        package = path.relative_to(ROOT).parts[0]
    except ValueError:
        return False
    opname = next((i.opname for i in dis.get_instructions(tb.tb_frame.f_code) if i.offset == tb.tb_lasti), None)
    return package in PROJECT_PACKAGES and opname == "RAISE_VARARGS"


def is_user_error(error: BaseException) -> bool:
    """The rule of this module's docstring: an OSError, or a ValueError/TypeError/ImportError that
    the project's own validation raised."""
    if isinstance(error, OSError):
        return True
    return isinstance(error, (ValueError, TypeError, ImportError)) and _raised_by_project(error)


def run_command(main: Callable, argv: list[str] | None = None):
    """``main(argv)``, a user error turned into one ``error:`` line and exit status 2 (`is_user_error`);
    with ``--debug`` in ``argv`` the exception propagates with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except Exception as error:
        if "--debug" in argv or not is_user_error(error):
            raise
        fail(str(error))


class _Lines:
    """Progress as plain lines: one every ``every`` updates and at the last (for logs and pipes)."""

    def __init__(self, total: int, initial: int, desc: str, every: int, stream):
        self.total, self.n, self.desc, self.every, self.stream, self.postfix = total, initial, desc, every, stream, {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            fields = "".join(f" {k}={v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total}{fields}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress(total: int, initial: int = 0, desc: str = "", every: int | None = None, stream=None):
    """A tqdm bar when ``stream`` (stderr) is a terminal, else plain lines every ``every`` steps (default:
    about twenty lines per run). Both take ``update(n)``, ``set_postfix(**values)`` and ``close()``; the
    postfix is shown with the next update."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)
    return _Lines(total, initial, desc, every or max(1, total // 20), stream)
