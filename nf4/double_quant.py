"""Double quantization: store the fp32 absmax constants in 8 bits (QLoRA section 3, "Double Quantization").

One fp32 absmax per 64 weights costs 32/64 = 0.5 bit per parameter. QLoRA subtracts their mean (the
absmax values are all positive, so centring them uses the signed code's both halves) and quantizes
them blockwise again, 256 constants per block, with the signed 8-bit dynamic map: 8/64 bits for the
codes + 32/(64*256) bits for the second-level fp32 absmax = 0.127 bit per parameter.

    offset        = mean(absmax)                                  (fp32)
    centred       = absmax - offset, cut into blocks of 256 (the last one padded with zeros)
    nested_absmax = max |centred| per block
    x             = centred * (1 / nested_absmax)
    code          = the dynamic-map code of x, chosen by the rule of one of bitsandbytes' kernels (below)

``rounding="cpu"`` matches ``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`` on CPU
bit for bit, including its edge cases (tested). bitsandbytes' CPU kernel does not search for the nearest code directly:
it maps x onto a 65536-entry table with ``index = trunc(((x + 1) * 0.5) * 65535 + 0.5)`` (fp32
arithmetic, one rounding per operation), and the table holds, for each grid point ``-1 + 2 i / 65535``,
the code nearest to it (a grid point on a midpoint takes the lower code). For most values this is the
nearest code; within ~1.5e-5 of a midpoint it can be the other neighbour. We build the same table and
index it the same way, so the stored bytes are identical. Its clamp turns NaN into -1: an all-zero
block (1 / 0 = inf, 0 * inf = NaN) and the zeros of a block whose absmax is so small (subnormal) that
its reciprocal overflows all get code 0, as there.

``rounding="cuda"`` follows its CUDA kernel (``kQuantizeBlockwise`` with the 8-bit map, ``dQuantize`` without
stochastic rounding; ``rounding.py`` for the fast-math arithmetic): x = centred * rcp(nested_absmax) with
subnormals flushed, no clamp, then a binary search of the 256 sorted code values: start at index 127, seven
halving steps (64, 32, ..., 1) to the right when x > value, else to the left, remembering the last
index passed on either side (starting at 0 and 255); it ends at a value v, and x takes the neighbour
on its side when it is strictly beyond their fp32 midpoint ``(neighbour + v) * 0.5``, else v's code.
A tie therefore goes to the index the search ended on, which is not always the lower one; NaN (a zero
block) fails every test and gets code 0, as on CPU. ``search_dynamic_code`` is that search, written for
whole tensors. Checked against bitsandbytes' CUDA kernel by ``python -m benchmarks.nf4 --device cuda``
(written but not yet run on a GPU).

Where bitsandbytes produces NaN (the mean of absmax values near the fp32 maximum overflows to inf),
``nf4.quantize`` raises instead (``double_quant_error`` says why).
"""
import functools

import torch
import torch.nn.functional as F

from .codebook import dynamic_code
from .rounding import flush_subnormals, kernel_reciprocal

NESTED_BLOCK_SIZE = 256  # absmax constants per second-level block, as in bitsandbytes
_GRID_POINTS = 65536


@functools.lru_cache(maxsize=None)
def _grid_to_code(device: torch.device) -> torch.Tensor:
    """uint8[65536]: the nearest dynamic-map code of each grid point -1 + 2 i / 65535."""
    code = dynamic_code()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_GRID_POINTS, dtype=torch.float32)) / (_GRID_POINTS - 1)
    return torch.bucketize(grid, midpoints).to(torch.uint8).to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_code_on(device: torch.device) -> torch.Tensor:
    return dynamic_code().to(device)


def search_dynamic_code(x: torch.Tensor) -> torch.Tensor:
    """uint8 code of each fp32 x by the CUDA kernel's binary search of the dynamic map (see above).

    The kernel re-reads the map's ends after the search when a side was never passed; they equal its
    starting bounds -1 and +1, so that step changes nothing. The midpoints of neighbouring map values
    are normal fp32 numbers, so flushing them (the kernel's FTZ) changes nothing either.
    """
    code = _dynamic_code_on(x.device)
    pivot = torch.full(x.shape, 127, dtype=torch.int64, device=x.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper, value = torch.full_like(x, -1.0), torch.full_like(x, 1.0), code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > value
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, value, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, value)
        pivot = pivot + torch.where(right, step, -step)
        value = code[pivot]
    right = x > value
    to_upper = torch.where(x > (upper + value) * 0.5, upper_pivot, pivot)
    to_lower = torch.where(x < (lower + value) * 0.5, lower_pivot, pivot)
    return torch.where(right, to_upper, to_lower).to(torch.uint8)


def quantize_absmax(absmax: torch.Tensor, rounding: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax[n] -> (uint8 codes[n], fp32 nested_absmax[ceil(n / 256)], fp32 offset (0-dim)).

    ``rounding``: "cpu" or "cuda", whose bitsandbytes kernel to follow (see above). No host sync: check
    the result with ``double_quant_error`` (``nf4.quantize`` folds that into its one finiteness check).
    """
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    n_blocks = -(-n // NESTED_BLOCK_SIZE)
    blocks = F.pad(centred, (0, n_blocks * NESTED_BLOCK_SIZE - n)).view(n_blocks, NESTED_BLOCK_SIZE)
    if rounding == "cuda":
        blocks = flush_subnormals(blocks)
        nested_absmax = blocks.abs().amax(dim=1)
        codes = search_dynamic_code(flush_subnormals(blocks * kernel_reciprocal(nested_absmax)[:, None]))
        return codes.reshape(-1)[:n], nested_absmax, offset
    nested_absmax = blocks.abs().amax(dim=1)
    normed = (blocks * (1.0 / nested_absmax)[:, None]).nan_to_num_(nan=-1.0).clamp_(-1.0, 1.0)
    grid_index = (((normed + 1.0) * 0.5) * (_GRID_POINTS - 1) + 0.5).to(torch.int64)  # truncation
    codes = _grid_to_code(absmax.device)[grid_index]
    return codes.reshape(-1)[:n], nested_absmax, offset


def double_quant_error(offset: torch.Tensor, nested_absmax: torch.Tensor) -> str | None:
    """Why the double-quantized scales are unusable (None if they are fine). Syncs: for error paths."""
    if not torch.isfinite(offset):
        return (f"double quantization overflows: the mean of the block absmax values is {offset.item()} in fp32 "
                "(absmax values near the fp32 maximum, 3.4e38); quantize with double_quant=False")
    if not torch.isfinite(nested_absmax).all():
        return "double quantization overflows: a second-level absmax is not finite; use double_quant=False"
    return None


def dequantize_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The inverse: code value * its block's nested absmax, then + offset (fp32, in that order, as bitsandbytes)."""
    n = codes.numel()
    padded = F.pad(codes, (0, -n % NESTED_BLOCK_SIZE)).long()
    values = _dynamic_code_on(codes.device).index_select(0, padded).view(-1, NESTED_BLOCK_SIZE)
    return values.mul_(nested_absmax[:, None]).view(-1)[:n].add_(offset)  # in place: a fresh tensor
