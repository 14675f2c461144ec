"""A Triton kernel where it can run, else the PyTorch path: one warning, then the fallback from then on.

Triton compiles a kernel and builds its launcher on the first launch. On a host without a C compiler or
Python headers, or on tensors without memory (fake tensors), that launch raises; the caller then wants
the PyTorch path, not a crash. After one launch has succeeded an error is a real one and is raised.
Used by the dequantize kernel (``dequantize.py``) and the CUDA rule's reciprocal (``rounding.py``).
"""
import subprocess
import warnings

# What a first launch that cannot run raises: no triton (ImportError), no compiler (RuntimeError), a
# compiler error (CalledProcessError), missing headers or driver (OSError), tensors without memory
# (AssertionError in Triton's argument checks)
LAUNCH_ERRORS = (ImportError, RuntimeError, OSError, AssertionError, subprocess.CalledProcessError)


def new_state() -> dict:
    """What a kernel's ``triton_or_fallback`` remembers: built once a launch succeeded, broken: why not."""
    return {"built": False, "broken": None}


def triton_or_fallback(state: dict, launch, fallback, failure: str):
    """``launch()``; if this kernel has never launched and it raises one of ``LAUNCH_ERRORS``, warn once
    ("nf4: the Triton <failure> (<error>)") and return ``fallback()``, as every later call does."""
    if state["broken"] is not None:
        return fallback()
    if state["built"]:
        return launch()
    try:
        result = launch()
    except LAUNCH_ERRORS as err:
        message = str(err).strip()
        state["broken"] = f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"
        warnings.warn(f"nf4: the Triton {failure.format(reason=state['broken'])}", RuntimeWarning, stacklevel=4)
        return fallback()
    state["built"] = True
    return result
