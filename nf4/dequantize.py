"""NF4 dequantization: w = NF4_CODE[code] * absmax[block], in fp32, then cast to the output dtype.

That order (fp32 product, one final rounding) is what bitsandbytes' ``dequantize_4bit`` computes, so the
results are bit-identical. With double quantization the absmax of each block is first recovered as
``dynamic_code[absmax_code] * nested_absmax + offset`` (see ``double_quant.py``).

Two implementations of the same arithmetic:
* ``backend="torch"``: pure PyTorch, the CPU path. One byte holds two codes, so a 256-entry table maps
  a byte straight to its pair of fp32 levels: one gather per byte instead of shifts and masks per code.
* ``backend="triton"``: one fused kernel (``triton_dequant.py``), used for CUDA tensors; on CPU it runs
  under ``TRITON_INTERPRET=1``.
``backend="auto"`` picks Triton for CUDA tensors and PyTorch otherwise.
"""
import functools
import importlib.util
import os

import torch

from .codebook import NF4_CODE
from .double_quant import dequantize_absmax
from .quantize import SUPPORTED_DTYPES
from .quantized_weight import QuantizedWeight

_CHUNK_VALUES = 1 << 20  # values per chunk: keeps the fp32 temporaries cache-sized


@functools.lru_cache(maxsize=None)
def _byte_to_pair(device: torch.device) -> torch.Tensor:
    """fp32[256, 2]: row b = (NF4 level of b's high nibble, NF4 level of b's low nibble)."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]], dim=1).to(device)


def block_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 absmax of every block (undoing double quantization if it was used)."""
    if qw.double_quant:
        return dequantize_absmax(qw.absmax, qw.nested_absmax, qw.offset)
    return qw.absmax


def dequantize_torch(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The PyTorch path, a cache-sized chunk at a time into reused buffers (no weight-sized temporaries)."""
    n, bs = qw.numel, qw.block_size
    absmax = block_absmax(qw)
    table = _byte_to_pair(qw.device)
    pair_bits = table.view(torch.int64).view(256)  # one 8-byte gather per byte, not a 2-float row copy
    out = torch.empty(n, dtype=dtype, device=qw.device)
    rows = max(1, _CHUNK_VALUES // bs)  # blocks per chunk
    byte_index = torch.empty(rows * bs // 2, dtype=torch.int32, device=qw.device)
    levels = torch.empty(rows * bs // 2, dtype=torch.int64, device=qw.device)
    n_full_blocks = n // bs
    for start in range(0, n_full_blocks, rows):
        k = min(rows, n_full_blocks - start)
        idx, lv = byte_index[: k * bs // 2], levels[: k * bs // 2]
        idx.copy_(qw.packed[start * bs // 2 : (start + k) * bs // 2])
        torch.index_select(pair_bits, 0, idx, out=lv)
        # the fp32 product in place, then rounded once into the output dtype by a plain converting copy
        # (a mixed-dtype torch.mul(out=bf16) computes into a hidden fp32 temporary and copies it anyway)
        product = lv.view(torch.float32).view(k, bs).mul_(absmax[start : start + k, None])
        out[start * bs : (start + k) * bs].view(k, bs).copy_(product)
    if n_full_blocks * bs < n:  # the last, partial block
        tail = table[qw.packed[n_full_blocks * bs // 2 :].to(torch.int64)].view(-1)
        out[n_full_blocks * bs :] = tail[: n - n_full_blocks * bs] * absmax[-1]
    return out.view(qw.shape)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """``qw`` back to a dense tensor of ``qw.shape`` in ``dtype`` (default: the dtype it was quantized from)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if backend == "auto":
        on_gpu = qw.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        backend = "triton" if on_gpu else "torch"
    if backend == "torch":
        return dequantize_torch(qw, dtype)
    if backend == "triton":
        if qw.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1, set before triton is imported")
        from .triton_dequant import dequantize_triton

        return dequantize_triton(qw, dtype)
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
