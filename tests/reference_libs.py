"""Import a reference library (bitsandbytes, peft, transformers, torchao) for a comparison test.

Without it a comparison test is skipped -- unless ``HOME70B_REQUIRE_COMPARE=1`` (set in CI), where a
missing reference library FAILS the test: a comparison that silently skips is a check that cannot fail.

    from reference_libs import reference
    bnb = reference("bitsandbytes")
"""
import importlib
import os

import pytest


def reference(name: str):
    """Return the imported module ``name``, or skip (fail under HOME70B_REQUIRE_COMPARE=1)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        message = f"reference library {name!r} is not installed ({err})"
        if os.environ.get("HOME70B_REQUIRE_COMPARE") == "1":
            pytest.fail(message + " and HOME70B_REQUIRE_COMPARE=1", pytrace=False)
        pytest.skip(message)
