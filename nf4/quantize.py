"""``nf4.quantize``: blockwise NF4 (QLoRA section 3, eq. 1 and 4), bit-exact with bitsandbytes' ``quantize_4bit``.

The algorithm is ``reference.py`` (read it first); this entry point checks the arguments and runs the
fast path (``fast_path.py``, chunked for the device the weight is on), then double quantization
(``double_quant.py``). One host sync per tensor: the final finiteness check. ``rounding`` picks whose bytes:
bitsandbytes' CPU backend's or its CUDA kernel's (``rounding.py``); by default the weight's device decides.
"""
import torch

from .checks import SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, check_block_size, check_flag, check_weight
from .double_quant import double_quant_error, quantize_absmax
from .fast_path import quantize_full_blocks
from .quantized_weight import QuantizedWeight
from .reference import blockwise_codes, pack
from .rounding import ROUNDINGS, check_rounding

__all__ = ["quantize", "SUPPORTED_BLOCK_SIZES", "SUPPORTED_DTYPES", "ROUNDINGS"]


def _quantize_tail(tail: torch.Tensor, block_size: int, absmax: torch.Tensor, packed: torch.Tensor,
                   rounding: str) -> None:
    """The last, partial block, by the reference (few values): its absmax and codes, an odd count padded."""
    tail_absmax, codes = blockwise_codes(tail.float(), block_size, rounding)  # NaN: some code; the caller raises
    absmax[-1:] = tail_absmax
    packed[-codes.numel() // 2 :] = pack(codes)


def quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True,
             rounding: str | None = None) -> QuantizedWeight:
    """Quantize ``w`` (fp32/bf16/fp16, any shape) to NF4; with ``double_quant`` also its absmax constants.

    ``rounding``: "cpu" or "cuda", the bytes of bitsandbytes' CPU backend or of its CUDA kernel (they differ
    only for values within about an ulp of a decision threshold, and for zero blocks; ``nf4/rounding.py``);
    None (default): the rule of the device ``w`` is on.
    Raises ValueError for NaN/Inf in ``w``, and for absmax values so large (near 3.4e38) that double
    quantization overflows (bitsandbytes returns NaN weights there).
    """
    check_weight(w)
    check_block_size(block_size)
    check_flag(double_quant, "double_quant")
    rounding = check_rounding(rounding, w.device)
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_full_blocks = n // block_size
    full = n_full_blocks * block_size
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=flat.device)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=flat.device)
    if n_full_blocks:
        quantize_full_blocks(flat[:full].view(n_full_blocks, block_size), absmax, packed, rounding)
    if full < n:
        _quantize_tail(flat[full:], block_size, absmax, packed, rounding)
    qw = QuantizedWeight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, block_size=block_size)
    finite = torch.isfinite(absmax).all()  # NaN and Inf propagate into their block's absmax
    if double_quant:
        codes, nested_absmax, offset = quantize_absmax(absmax, rounding)
        finite &= torch.isfinite(offset) & torch.isfinite(nested_absmax).all()
        qw = qw.with_tensors(absmax=codes, nested_absmax=nested_absmax, offset=offset)
    if not finite.item():  # the one host sync
        if not torch.isfinite(absmax).all():
            raise ValueError(f"w (shape {tuple(w.shape)}) contains NaN or Inf: a block's absmax would be meaningless")
        raise ValueError(f"w (shape {tuple(w.shape)}): {double_quant_error(offset, nested_absmax)}")
    return qw
