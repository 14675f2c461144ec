"""``nf4.quantize``: blockwise NF4 (QLoRA section 3, eq. 1 and 4), bit-exact with bitsandbytes' ``quantize_4bit``.

The algorithm is ``reference.py`` (read it first); this entry point checks the arguments and runs the
fast path (``fast_path.py``, chunked for the device the weight is on), then double quantization
(``double_quant.py``). One host sync per tensor: the final finiteness check.
"""
import torch

from .checks import SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, check_block_size, check_flag, check_weight
from .double_quant import double_quant_error, quantize_absmax
from .fast_path import quantize_full_blocks
from .quantized_weight import QuantizedWeight
from .reference import SMALLEST_ABSMAX, nearest_code, pack

__all__ = ["quantize", "SUPPORTED_BLOCK_SIZES", "SUPPORTED_DTYPES"]


def _quantize_tail(tail: torch.Tensor, absmax: torch.Tensor, packed: torch.Tensor) -> None:
    """The last, partial block, as the reference: divide by the clamped absmax; pad an odd count with code 7."""
    tail_absmax = tail.abs().amax().float().clamp(min=SMALLEST_ABSMAX)
    absmax[-1] = tail_absmax
    codes = nearest_code(tail.float() / tail_absmax)  # NaN gets some code; the caller raises
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    packed[-codes.numel() // 2 :] = pack(codes)


def quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """Quantize ``w`` (fp32/bf16/fp16, any shape) to NF4; with ``double_quant`` also its absmax constants.

    Raises ValueError for NaN/Inf in ``w``, and for absmax values so large (near 3.4e38) that double
    quantization overflows (bitsandbytes returns NaN weights there).
    """
    check_weight(w)
    check_block_size(block_size)
    check_flag(double_quant, "double_quant")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_full_blocks = n // block_size
    full = n_full_blocks * block_size
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=flat.device)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=flat.device)
    if n_full_blocks:
        quantize_full_blocks(flat[:full].view(n_full_blocks, block_size), absmax, packed)
    if full < n:
        _quantize_tail(flat[full:], absmax, packed)
    qw = QuantizedWeight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, block_size=block_size)
    finite = torch.isfinite(absmax).all()  # NaN and Inf propagate into their block's absmax
    if double_quant:
        codes, nested_absmax, offset = quantize_absmax(absmax)
        finite &= torch.isfinite(offset) & torch.isfinite(nested_absmax).all()
        qw = qw.with_tensors(absmax=codes, nested_absmax=nested_absmax, offset=offset)
    if not finite.item():  # the one host sync
        if not torch.isfinite(absmax).all():
            raise ValueError(f"w (shape {tuple(w.shape)}) contains NaN or Inf: a block's absmax would be meaningless")
        raise ValueError(f"w (shape {tuple(w.shape)}): {double_quant_error(offset, nested_absmax)}")
    return qw
