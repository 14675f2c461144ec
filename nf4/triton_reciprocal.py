"""The reciprocal of bitsandbytes' CUDA quantize kernel, on the GPU: the PTX instruction ``rcp.approx.ftz.f32``.

bitsandbytes compiles its kernels with ``--use_fast_math``, so ``1.0f / absmax`` becomes the hardware's
approximate reciprocal (``MUFU.RCP`` in its shipped sm_90 code, with no refinement step; CUDA documents it
as within 1 ulp), with subnormals flushed to zero. PyTorch's ``1 / x`` rounds correctly instead, which
can differ by an ulp. One tiny kernel issues the same instruction, so the reciprocal, and with it every
code, matches bit for bit. Only ``rounding.kernel_reciprocal`` calls it (one launch per chunk of blocks,
on 1/64 of the weight's values). Written but not yet run on a GPU; the Triton interpreter cannot run PTX.
"""
import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _reciprocal_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=1.0)
    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(out_ptr + offsets, r, mask=inside)


def approximate_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of every element of a CUDA fp32 tensor (a new contiguous tensor of x's shape)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _reciprocal_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, out, x.numel(), BLOCK=_BLOCK)
    return out
