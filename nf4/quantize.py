"""Blockwise NF4 quantization (QLoRA section 3, eq. 1 and 4), bit-exact with bitsandbytes' ``quantize_4bit``.

For each block of ``block_size`` consecutive elements of the flattened tensor:
    absmax = max |w|,  x = w * (1 / absmax) in [-1, 1],  code = the nearest of the 16 NF4 levels.
"Nearest" is decided against the 15 midpoints between neighbouring levels, and a value exactly on a
midpoint takes the LOWER code (``torch.bucketize`` with ``right=False``), as bitsandbytes does. Two
codes go into one byte, the first element in the high nibble. The computation follows bitsandbytes'
CPU ``quantize_4bit`` operation by operation (fp32 throughout; x = w * (1/absmax) for full blocks and
w / absmax for the last, partial one; an all-zero partial block stores absmax 1e-38; an odd element
count is padded with one zero, code 7), so a tensor quantized here and there gives identical bytes.
"""
import functools

import torch

from .codebook import NF4_CODE
from .double_quant import quantize_absmax
from .quantized_weight import QuantizedWeight

SUPPORTED_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
_CHUNK_VALUES = 1 << 20  # values per chunk: keeps the fp32 temporaries cache-sized


def check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}")


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"w must be float32, bfloat16 or float16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w is empty (shape {tuple(w.shape)}): nothing to quantize")


def _check_finite(absmax: torch.Tensor) -> None:
    """NaN and Inf propagate into their block's absmax, so checking the absmax checks the weight."""
    if not torch.isfinite(absmax).all():
        raise ValueError("w contains NaN or Inf: a block's absmax would be meaningless")


def _codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code of values in [-1, 1]; on a midpoint, the lower one (a binary search per value)."""
    return torch.bucketize(scaled, NF4_MIDPOINTS.to(scaled.device), out_int32=True)


# The same answer ~9x faster on CPU, for the bulk of the weight. The 15 midpoints are at least 0.08
# apart, so cutting the line into cells of width 1/32 leaves at most one midpoint per cell. A table gives,
# per cell, how many midpoints lie below the cell; one comparison with the next midpoint finishes:
#     code = below[cell(x)] + (x > midpoint[below[cell(x)]])
# Rounding can put x into a neighbouring cell only when x is within ~1e-7 of a cell edge, and no midpoint
# is that close to an edge (the nearest is 1.7e-3 away, checked below), so the count is still exact.
_CELLS_PER_UNIT = 32


@functools.lru_cache(maxsize=None)
def _cell_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 midpoints-below per cell, fp32 midpoints + inf); cell c covers [c/32 - 2, (c+1)/32 - 2)."""
    edges = torch.arange(4 * _CELLS_PER_UNIT + 2, dtype=torch.float64) / _CELLS_PER_UNIT - 2
    midpoints = NF4_MIDPOINTS.double()
    assert (midpoints[:, None] - edges[None, :]).abs().min() > 1e-4, "a midpoint sits on a cell edge"
    assert torch.bincount(torch.bucketize(midpoints, edges, right=True)).max() <= 1, "two midpoints in one cell"
    below = torch.bucketize(edges, midpoints).to(torch.int32)  # number of midpoints < each cell's left edge
    next_midpoint = torch.cat([NF4_MIDPOINTS, torch.tensor([float("inf")])])
    return below.to(device), next_midpoint.to(device)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """int codes[2k] -> uint8[k]: element 2i in the high nibble, element 2i+1 in the low nibble."""
    pairs = codes.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8)


def _quantize_full_blocks(blocks: torch.Tensor, absmax: torch.Tensor, packed: torch.Tensor) -> None:
    """Fill ``absmax`` and ``packed`` for a [n_blocks, block_size] view, a cache-sized chunk at a time.

    The arithmetic is the one in the module docstring; the chunking and the reused ``out=`` buffers
    only avoid allocating (and page-faulting) tensors as large as the weight.
    """
    n_blocks, block_size = blocks.shape
    rows = max(1, _CHUNK_VALUES // block_size)
    below, next_midpoint = _cell_tables(blocks.device)
    scaled = torch.empty(rows, block_size, dtype=torch.float32, device=blocks.device)
    scratch = torch.empty(rows * block_size, dtype=torch.float32, device=blocks.device)
    cell = torch.empty(rows * block_size, dtype=torch.int32, device=blocks.device)
    codes = torch.empty(rows * block_size, dtype=torch.int32, device=blocks.device)
    above = torch.empty(rows * block_size, dtype=torch.bool, device=blocks.device)
    pair_bits = torch.empty(rows * block_size // 2, dtype=torch.int64, device=blocks.device)
    for start in range(0, n_blocks, rows):
        k = min(rows, n_blocks - start)
        m = k * block_size
        x = scaled[:k]
        x.copy_(blocks[start : start + k])  # to fp32
        # max |w| = max(max w, -min w): no |w| temporary (and amax + amin beat aminmax on CPU)
        chunk_absmax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_(), out=absmax[start : start + k])
        _check_finite(chunk_absmax)
        x.mul_((1.0 / chunk_absmax.clamp(min=1e-38))[:, None])
        x = x.view(-1)
        # nearest code, as _codes() but by cells (see above): cell = trunc((x + 2) * 32)
        torch.mul(x, _CELLS_PER_UNIT, out=scratch[:m]).add_(2 * _CELLS_PER_UNIT)
        cell[:m].copy_(scratch[:m])
        torch.index_select(below, 0, cell[:m], out=codes[:m])
        torch.index_select(next_midpoint, 0, codes[:m], out=scratch[:m])
        codes[:m].add_(torch.gt(x, scratch[:m], out=above[:m]))
        # Pack: viewed as int64, a pair of int32 codes (c0, c1) is c0 + (c1 << 32) (little endian), so
        # ((v << 4) | (v >> 32)) has (c0 << 4) | c1 in its low byte; the uint8 copy keeps that byte.
        v, p = codes[:m].view(torch.int64), pair_bits[: m // 2]
        torch.bitwise_left_shift(v, 4, out=p).bitwise_or_(v >> 32)
        packed[start * block_size // 2 : start * block_size // 2 + m // 2].copy_(p)


def quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """Quantize ``w`` (fp32/bf16/fp16, any shape) to NF4; with ``double_quant`` also its absmax constants."""
    _check_weight(w)
    check_block_size(block_size)
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_full_blocks = n // block_size
    full = n_full_blocks * block_size

    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=flat.device)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=flat.device)
    if n_full_blocks:
        _quantize_full_blocks(flat[:full].view(n_full_blocks, block_size), absmax, packed)
    if full < n:  # the last, partial block: bitsandbytes divides here and stores the clamped absmax
        tail_absmax = flat[full:].abs().amax().float().clamp(min=1e-38)
        _check_finite(tail_absmax)
        absmax[-1] = tail_absmax
        tail = flat[full:].float() / tail_absmax
        if tail.numel() % 2:  # an odd count is padded with one zero (code 7)
            tail = torch.cat([tail, tail.new_zeros(1)])
        packed[full // 2 :] = _pack(_codes(tail))

    qw = QuantizedWeight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, block_size=block_size)
    if double_quant:
        codes, nested_absmax, offset = quantize_absmax(absmax)
        qw = qw.with_tensors(absmax=codes, nested_absmax=nested_absmax, offset=offset)
    return qw

