"""The GPU path: one fused Triton kernel, 8-bit absmax (double dequant) + 4-bit codes -> fp32/bf16/fp16.

Byte-wise, as a GPU engineer would write it. A program takes a tile of ``ROWS x COLS`` packed bytes; a
row of the tile is ``COLS`` consecutive bytes inside ONE quantization block (``COLS`` divides
``block_size / 2``, both compile-time constants), so per row (per block when ``COLS = block_size / 2``):

    b      = first byte of the row // (block_size / 2)    # which absmax block: one shift per ROW
    absmax = dynamic_code[absmax_q[b]] * nested_absmax[b // 256] + offset   # double dequant, once per row
    byte   = packed[row bytes]                             # contiguous, coalesced byte loads
    hi, lo = nf4_code[byte >> 4], nf4_code[byte & 15]      # both nibbles of each byte (16-entry table)
    out[2 * byte index + (0, 1)] = interleave(hi * absmax, lo * absmax)   # one contiguous store

No per-element division or modulo; the products are fp32, rounded once to the output dtype by a cast
(round to nearest even, ``cvt.rn`` on the GPU). The Triton interpreter's fp32 -> bf16 cast truncates
instead, so under ``TRITON_INTERPRET=1`` the rounding is spelled out in integer arithmetic (the same
result). ``enable_fp_fusion=False`` keeps ``a * b + c`` two roundings (no FMA), as bitsandbytes. The
result is bit-identical to ``reference.py`` (tested under the interpreter). ``ROWS`` and ``num_warps``
are autotuned on the GPU; the interpreter runs one fixed configuration.

Bytes moved per output element, block size 64 with double quantization, bf16 output:
    read 0.5 (codes) + 1/64 (8-bit absmax) + 4/(64*256) (nested absmax) + write 2 = 2.516 B
(fp32 output: 4.516 B). So the kernel is bandwidth-bound: ``python -m benchmarks.nf4 --device cuda``
reports its GB/s against a plain device copy and bitsandbytes' CUDA kernel. Written but not yet run on
a GPU (tested only under the interpreter).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .codebook import NF4_CODE, dynamic_code
from .double_quant import NESTED_BLOCK_SIZE
from .quantized_weight import QuantizedWeight

MAX_COLS = 256  # bytes per tile row (512 output values); block sizes above 512 take several rows per block
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, in integer arithmetic (for the interpreter, whose cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, nf4_code_ptr, dynamic_code_ptr, out_ptr,
    n_elements, n_rows,
    HALF_BLOCK: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, INTEGER_BF16_ROUNDING: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)          # [ROWS] tile rows of COLS bytes
    row_ok = row < n_rows
    block = (row * COLS) // HALF_BLOCK                           # per row; a shift (powers of two)
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + block, mask=row_ok, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=row_ok, other=0.0)
        absmax = tl.load(dynamic_code_ptr + code8, mask=row_ok, other=0.0) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=row_ok, other=0.0)
    byte_index = row[:, None] * COLS + tl.arange(0, COLS)[None, :]  # [ROWS, COLS]
    byte = tl.load(packed_ptr + byte_index, mask=byte_index * 2 < n_elements, other=0).to(tl.int32)
    hi = tl.load(nf4_code_ptr + (byte >> 4)) * absmax[:, None]   # fp32 products
    lo = tl.load(nf4_code_ptr + (byte & 0xF)) * absmax[:, None]
    values = tl.interleave(hi, lo)                                # [ROWS, 2 * COLS]: hi, lo, hi, lo, ...
    out_index = row[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    if INTEGER_BF16_ROUNDING:
        result = _round_to_bf16(values)
    else:
        result = values.to(out_dtype)
    tl.store(out_ptr + out_index, result, mask=out_index < n_elements)


_CONFIGS = [triton.Config({"ROWS": rows}, num_warps=warps) for rows in (4, 8, 16, 32) for warps in (2, 4, 8)]
_autotuned_kernel = triton.autotune(configs=_CONFIGS, key=["HALF_BLOCK", "COLS", "DOUBLE_QUANT"])(_nf4_dequant_kernel)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return NF4_CODE.to(device), dynamic_code().to(device)


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``qw`` with one launch (CUDA, or CPU under TRITON_INTERPRET=1), into ``out`` if given."""
    n = qw.numel
    if n >= 2**31:
        raise ValueError(f"qw has {n} values; the Triton kernel indexes with int32 (< 2**31): use backend='torch'")
    out = torch.empty(n, dtype=dtype, device=qw.device) if out is None else out
    nf4_code, dyn_code = _tables(qw.device)
    double = qw.double_quant
    nested = qw.nested_absmax if double else qw.absmax  # unused placeholders without double quant
    offset = qw.offset if double else qw.absmax
    half_block = qw.block_size // 2
    cols = min(half_block, MAX_COLS)
    n_rows = triton.cdiv(qw.packed.numel(), cols)
    args = (qw.packed, qw.absmax, nested, offset, nf4_code, dyn_code, out, n, n_rows)
    constants = dict(HALF_BLOCK=half_block, COLS=cols, NESTED_BLOCK=NESTED_BLOCK_SIZE, DOUBLE_QUANT=double,
                     INTEGER_BF16_ROUNDING=INTERPRETED and dtype == torch.bfloat16)
    if INTERPRETED:
        _nf4_dequant_kernel[(triton.cdiv(n_rows, 8),)](*args, **constants, ROWS=8, enable_fp_fusion=False)
    else:
        grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)  # noqa: E731
        _autotuned_kernel[grid](*args, **constants, enable_fp_fusion=False)
    return out.view(qw.shape)
