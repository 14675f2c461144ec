"""Double quantization: store the fp32 absmax constants in 8 bits (QLoRA section 3, "Double Quantization").

One fp32 absmax per 64 weights costs 32/64 = 0.5 bit per parameter. QLoRA subtracts their mean (the
absmax values are all positive, so centring them uses the signed code's both halves) and quantizes
them blockwise again, 256 constants per block, with the signed 8-bit dynamic map: 8/64 bits for the
codes + 32/(64*256) bits for the second-level fp32 absmax = 0.127 bit per parameter.

    offset        = mean(absmax)                                  (fp32)
    centred       = absmax - offset, cut into blocks of 256 (the last one padded with zeros)
    nested_absmax = max |centred| per block
    x             = centred * (1 / nested_absmax), clamped to [-1, 1]; NaN (0 * inf) -> -1
    code          = the dynamic-map code of x, chosen by bitsandbytes' grid rule (below)

This matches ``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`` on CPU bit for
bit, including its edge cases. bitsandbytes' CPU kernel does not search for the nearest code directly:
it maps x onto a 65536-entry table with ``index = trunc(((x + 1) * 0.5) * 65535 + 0.5)`` (fp32
arithmetic, one rounding per operation), and the table holds, for each grid point ``-1 + 2 i / 65535``,
the code nearest to it (a grid point on a midpoint takes the lower code). For most values this is the
nearest code; within ~1.5e-5 of a midpoint it can be the other neighbour. We build the same table and
index it the same way, so the stored bytes are identical. Its clamp turns NaN into -1: an all-zero
block (1 / 0 = inf, 0 * inf = NaN) and the zeros of a block whose absmax is so small (subnormal) that
its reciprocal overflows all get code 0, as there. Whether bitsandbytes' CUDA kernel rounds the same
way is checked by ``python -m benchmarks.nf4 --device cuda`` (written but not yet run on a GPU).

Where bitsandbytes produces NaN (the mean of absmax values near the fp32 maximum overflows to inf),
``nf4.quantize`` raises instead (``double_quant_error`` says why).
"""
import functools

import torch
import torch.nn.functional as F

from .codebook import dynamic_code

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


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax[n] -> (uint8 codes[n], fp32 nested_absmax[ceil(n / 256)], fp32 offset (0-dim)).

    No host sync: check the result with ``double_quant_error`` (``nf4.quantize`` folds that into its one
    finiteness check per tensor).
    """
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    n_blocks = -(-n // NESTED_BLOCK_SIZE)
    blocks = F.pad(centred, (0, n_blocks * NESTED_BLOCK_SIZE - n)).view(n_blocks, NESTED_BLOCK_SIZE)
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
