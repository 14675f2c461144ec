"""One-line user errors for the single-process commands (``recipe.generate``, ``recipe.export``).

A user error -- a bad flag value, a missing or invalid file -- prints ``error: ...`` on stderr and exits
with status 2, without a traceback; ``--debug`` shows the traceback. Flags are checked while parsing.
"""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is the one line ``error: ...`` (no usage block) and exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive(kind):
    """An argparse ``type`` accepting a number of ``kind`` that is > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def run(main, argv=None):
    """Call ``main(argv)``; turn a user error into one ``error:`` line and exit status 2."""
    try:
        return main(argv)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
