"""One fused Triton kernel: 8-bit absmax (double dequant) + 4-bit codes -> fp32/bf16/fp16, in ONE launch.

Each program handles ``BLOCK`` consecutive output elements. For element i:

    byte   = packed[i // 2]                        two codes per byte ...
    code   = byte >> 4 if i is even else byte & 15 # ... the first element in the high nibble
    level  = nf4_code[code]                        # 16-entry table, stays in cache
    b      = i // block_size                       # which absmax block
    absmax = dynamic_code[absmax_q[b]] * nested_absmax[b // 256] + offset   # double dequant, fused
    out[i] = level * absmax                        # fp32, rounded once (to nearest even) to the output dtype

The same fp32 operations in the same order as the PyTorch path and bitsandbytes, so the result is
bit-identical. ``enable_fp_fusion=False`` stops the compiler from turning ``a * b + c`` into one FMA
(one rounding instead of two), which would change the last bit. Without double quantization the
absmax is read directly (``DOUBLE_QUANT`` is a compile-time constant, so the branch costs nothing).

Memory traffic per element: 0.5 byte of codes + 2 bytes (bf16) written, the scales ~1/64 of that, so
the kernel is bandwidth-bound: ``benchmarks/gpu.sh`` compares its bytes/s with a plain copy's.
On CPU, set ``TRITON_INTERPRET=1`` before importing triton to run it under the interpreter (slow).
"""
import functools

import torch
import triton
import triton.language as tl

from .codebook import NF4_CODE, dynamic_code
from .double_quant import NESTED_BLOCK_SIZE
from .quantized_weight import QuantizedWeight

BLOCK = 1024  # output elements per program

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, in integer arithmetic (what torch's ``.to(bfloat16)`` does).

    Spelled out because the interpreter's float cast truncates; this is exact on GPU and CPU alike.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, nf4_code_ptr, dynamic_code_ptr, out_ptr,
    n_elements, block_size,
    NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
    OUT_DTYPE: tl.constexpr, OUT_BF16: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # output element indices of this program
    mask = i < n_elements
    byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(i % 2 == 0, byte >> 4, byte & 0xF)
    level = tl.load(nf4_code_ptr + code, mask=mask, other=0.0)
    block = i // block_size
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=mask, other=0.0)
        absmax = tl.load(dynamic_code_ptr + absmax_code, mask=mask, other=0.0) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    value = level * absmax  # fp32
    if OUT_BF16:
        tl.store(out_ptr + i, _round_to_bf16(value), mask=mask)
    else:
        tl.store(out_ptr + i, value.to(OUT_DTYPE), mask=mask)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return NF4_CODE.to(device), dynamic_code().to(device)


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``qw`` with one launch of the fused kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    n = qw.numel
    out = torch.empty(n, dtype=dtype, device=qw.device)
    nf4_code, dyn_code = _tables(qw.device)
    double = qw.double_quant
    nested = qw.nested_absmax if double else qw.absmax  # unused placeholders without double quant
    offset = qw.offset if double else qw.absmax
    grid = (triton.cdiv(n, BLOCK),)
    _nf4_dequant_kernel[grid](
        qw.packed, qw.absmax, nested, offset, nf4_code, dyn_code, out, n, qw.block_size,
        NESTED_BLOCK=NESTED_BLOCK_SIZE, DOUBLE_QUANT=double, BLOCK=BLOCK, OUT_DTYPE=_TL_DTYPE[dtype],
        OUT_BF16=dtype == torch.bfloat16,
        enable_fp_fusion=False,
    )
    return out.view(qw.shape)
