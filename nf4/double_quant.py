"""Double quantization: store the fp32 absmax constants in 8 bits (QLoRA section 3, "Double Quantization").

One fp32 absmax per 64 weights costs 32/64 = 0.5 bit per parameter. QLoRA subtracts their mean (the
absmax values are all positive, so centring them uses the signed code's both halves) and quantizes
them blockwise again, 256 constants per block, with the signed 8-bit dynamic map: 8/64 bits for the
codes + 32/(64*256) bits for the second-level fp32 absmax = 0.127 bit per parameter.

This matches ``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`` on CPU bit for
bit. bitsandbytes' CPU kernel (``quantize_cpu``) does not search for the nearest code directly: it
maps the normalised value x in [-1, 1] onto a 65536-entry table with
``index = trunc(((x + 1) * 0.5) * 65535 + 0.5)`` (fp32 arithmetic, one rounding per operation), and
the table holds, for each grid point ``-1 + 2 i / 65535``, the code nearest to it (midpoint rule, a
grid point on a midpoint takes the lower code). For most values this is the nearest code; within
~1.5e-5 of a midpoint it can be the other neighbour. We build the same table and index it the same
way, so the stored bytes are identical.
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
    """fp32 absmax[n] -> (uint8 codes[n], fp32 nested_absmax[ceil(n / 256)], fp32 offset (0-dim))."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    n_blocks = -(-n // NESTED_BLOCK_SIZE)
    blocks = F.pad(centred, (0, n_blocks * NESTED_BLOCK_SIZE - n)).view(n_blocks, NESTED_BLOCK_SIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(nested_absmax > 0, 1.0 / nested_absmax, torch.zeros_like(nested_absmax))
    normed = (blocks * inverse[:, None]).clamp(-1.0, 1.0)
    grid_index = (((normed + 1.0) * 0.5) * (_GRID_POINTS - 1) + 0.5).to(torch.int64)  # truncation
    codes = _grid_to_code(absmax.device)[grid_index]
    codes.masked_fill_(nested_absmax[:, None] == 0, 0)  # bitsandbytes writes code 0 for an all-zero block
    return codes.reshape(-1)[:n], nested_absmax, offset


def dequantize_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The inverse: code value * its block's nested absmax, then + offset (fp32, in that order, as bitsandbytes)."""
    n = codes.numel()
    values = _dynamic_code_on(codes.device)[F.pad(codes, (0, -n % NESTED_BLOCK_SIZE)).to(torch.int64)]
    return (values.view(-1, NESTED_BLOCK_SIZE) * nested_absmax[:, None]).view(-1)[:n] + offset
