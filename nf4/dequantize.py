"""``nf4.dequantize``: w = NF4_CODE[code] * absmax[block], in fp32, then one rounding to the output dtype.

That order (fp32 product, one final rounding) is what bitsandbytes' ``dequantize_4bit`` computes, so the
results are bit-identical. With double quantization the absmax of each block is first recovered as
``dynamic_code[absmax_code] * nested_absmax + offset`` (``double_quant.py``).

Three implementations of the same arithmetic, all tested bit for bit against each other:
* ``reference.dequantize_reference``: the plain definition (read it first);
* ``backend="torch"``: the fast PyTorch path (``fast_path.py``), what CPU tensors use;
* ``backend="triton"``: one fused kernel (``triton_dequant.py``), what CUDA tensors use; on CPU it runs
  under ``TRITON_INTERPRET=1`` (set before triton is imported).
``backend="auto"`` picks Triton for CUDA tensors and PyTorch otherwise. If the Triton kernel cannot be
built there (no C compiler or Python headers for its launcher), ``auto`` warns once and uses PyTorch.

``out=`` writes into a preallocated tensor: a training loop that dequantizes every layer twice per step
reuses one workspace instead of allocating (and, on CPU, page-faulting) a fresh weight-sized tensor.
"""
import importlib.util
import os

import torch

from .checks import check_dtype, check_out, check_quantized_weight
from .fast_path import dequantize_into
from .quantized_weight import QuantizedWeight
from .reference import block_absmax
from .triton_fallback import new_state, triton_or_fallback

__all__ = ["dequantize", "block_absmax"]
BACKENDS = ("auto", "torch", "triton")
_triton_state = new_state()  # whether the kernel has launched, or why it cannot


def dequantize_torch(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fast PyTorch path into ``out`` (allocated if None)."""
    result = torch.empty(qw.shape, dtype=dtype, device=qw.device) if out is None else out
    dequantize_into(qw, block_absmax(qw), result.view(-1))
    return result.view(qw.shape)


def _triton(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    from .triton_dequant import dequantize_triton

    return dequantize_triton(qw, dtype, out)


def _triton_or_fallback(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """Triton; if its first launch cannot build the kernel, one warning and the PyTorch path from then on."""
    return triton_or_fallback(_triton_state, lambda: _triton(qw, dtype, out), lambda: dequantize_torch(qw, dtype, out),
                              "dequantize kernel could not be built ({reason}); using the PyTorch path")


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, backend: str = "auto",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``qw`` back to a dense tensor of ``qw.shape`` in ``dtype`` (default: the dtype it was quantized from).

    ``out``: a contiguous tensor of that shape (or flat), dtype and device to write into; returned
    viewed as ``qw.shape``.
    """
    check_quantized_weight(qw)
    dtype = qw.dtype if dtype is None else dtype
    check_dtype(dtype)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if out is not None:
        check_out(out, qw, dtype)
    if backend == "auto":
        if qw.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return _triton_or_fallback(qw, dtype, out)
        backend = "torch"
    if backend == "torch":
        return dequantize_torch(qw, dtype, out)
    if qw.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1, set before triton is imported")
    return _triton(qw, dtype, out)
