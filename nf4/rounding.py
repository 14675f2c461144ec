"""Which bitsandbytes kernel ``nf4.quantize`` reproduces byte for byte: its CPU backend's or its CUDA kernel's.

Both pick the code of x = w / absmax as "how many thresholds lie strictly below x", but they compute x and
the thresholds differently, so a value within about an ulp of a threshold can get neighbouring codes:

``rounding="cpu"`` (bitsandbytes 0.50's CPU backend, PyTorch ops, read from its installed source):
    absmax = max |w| per block; full blocks x = w * (1 / max(absmax, 1e-38)), the last, partial block
    x = w / max(absmax, 1e-38) (stored absmax 1e-38 if the tail is all zero); thresholds ``NF4_MIDPOINTS``
    (computed in fp32); an odd count is padded with code 7. Double quantization: the 65536-point grid of
    its C++ ``quantize_cpu`` (``double_quant.py``).
``rounding="cuda"`` (its ``kQuantizeBlockwise`` kernel; compiled with ``--use_fast_math``: the shipped
    sm_90 code of 0.50.2 computes absmax with ``FMNMX.FTZ``, the reciprocal with ``MUFU.RCP`` and the
    products with ``FMUL.FTZ``, then ``FSETP.GT.FTZ`` against the 15 thresholds):
    subnormal inputs count as zero (flush to zero); absmax = max |w| per block, stored as is (0 for a
    zero block); every block, the partial last one included, x = w * rcp(absmax), where rcp is the
    hardware's approximate reciprocal (within 1 ulp of 1 / absmax; a subnormal result flushed to zero);
    thresholds ``NF4_CUDA_THRESHOLDS`` (the kernel's float literals, four of them one ulp off the fp32
    midpoints); the pad of an odd count is the value 0 of the last block. A zero block gives
    0 * rcp(0) = 0 * inf = NaN, which no threshold is below: code 0 (CPU: code 7). Double quantization:
    the same scaling, then the kernel's binary search over the 256-entry dynamic map (``double_quant.py``).

The default is the rule of the device the weight is on. On a GPU the reciprocal is the same hardware
instruction (``triton_reciprocal.py``); elsewhere it is the correctly rounded 1 / absmax, which can
differ from it by an ulp, so CUDA-rule bytes computed on the CPU are the kernel's except, rarely, at
a value within an ulp of a threshold. The CUDA rule is written from the kernel's source and compiled code
and tested on the CPU; it has not yet been run on a GPU against bitsandbytes.
"""
import functools
import importlib.util

import torch

from .codebook import NF4_CUDA_THRESHOLDS, NF4_MIDPOINTS
from .triton_fallback import new_state, triton_or_fallback

ROUNDINGS = ("cpu", "cuda")
SMALLEST_NORMAL = 2.0**-126  # fp32: below this magnitude a flush-to-zero unit reads a value as 0
_triton_state = new_state()  # whether the reciprocal kernel has launched, or why it cannot


def check_rounding(rounding, device: torch.device) -> str:
    """``rounding`` validated; None means the rule of bitsandbytes' kernel for ``device`` ("cuda" on a GPU)."""
    if rounding is None:
        return "cuda" if device.type == "cuda" else "cpu"
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS} (or None: the weight's device decides), "
                         f"got {rounding!r}")
    return rounding


@functools.lru_cache(maxsize=None)
def thresholds(rounding: str, device: torch.device) -> torch.Tensor:
    """The 15 fp32 decision boundaries of the rule, on ``device``."""
    return (NF4_CUDA_THRESHOLDS if rounding == "cuda" else NF4_MIDPOINTS).to(device)


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """x with every subnormal (|x| < 2^-126, nonzero) replaced by 0, as an FTZ instruction reads it."""
    return x.masked_fill(x.abs() < SMALLEST_NORMAL, 0.0)


def kernel_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """rcp(absmax) as the CUDA kernel computes it (fp32, subnormal results flushed): on a GPU the same
    approximate instruction; elsewhere (or if Triton cannot launch) the correctly rounded 1 / absmax."""
    if absmax.device.type == "cuda" and importlib.util.find_spec("triton"):
        return triton_or_fallback(_triton_state, lambda: _approximate_reciprocal(absmax),
                                  lambda: flush_subnormals(1.0 / absmax),
                                  "reciprocal could not run ({reason}); the CUDA rounding rule uses the correctly "
                                  "rounded 1 / absmax (within 1 ulp of the kernel's)")
    return flush_subnormals(1.0 / absmax)


def _approximate_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    from .triton_reciprocal import approximate_reciprocal  # imports triton

    return approximate_reciprocal(absmax)
