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
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or Inf: a block's absmax would be meaningless")


def _codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code of values in [-1, 1]; on a midpoint, the lower one."""
    return torch.bucketize(scaled, NF4_MIDPOINTS.to(scaled.device), out_int32=True)


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
    scaled = torch.empty(rows, block_size, dtype=torch.float32, device=blocks.device)
    codes = torch.empty(rows * block_size, dtype=torch.int32, device=blocks.device)
    pair_bits = torch.empty(rows * block_size // 2, dtype=torch.int64, device=blocks.device)
    midpoints = NF4_MIDPOINTS.to(blocks.device)
    for start in range(0, n_blocks, rows):
        k = min(rows, n_blocks - start)
        x, c, p = scaled[:k], codes[: k * block_size], pair_bits[: k * block_size // 2]
        x.copy_(blocks[start : start + k])  # to fp32
        low, high = torch.aminmax(x, dim=1)  # max |w| = max(max w, -min w)
        chunk_absmax = torch.maximum(high, low.neg_(), out=absmax[start : start + k])
        x.mul_((1.0 / chunk_absmax.clamp(min=1e-38))[:, None])
        torch.bucketize(x.view(-1), midpoints, out_int32=True, out=c)
        # Pack: viewed as int64, a pair of int32 codes (c0, c1) is c0 + (c1 << 32) (little endian), so
        # ((v << 4) | (v >> 32)) has (c0 << 4) | c1 in its low byte; the uint8 copy keeps that byte.
        v = c.view(torch.int64)
        torch.bitwise_left_shift(v, 4, out=p).bitwise_or_(v >> 32)
        packed[start * block_size // 2 : (start + k) * block_size // 2].copy_(p)


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

