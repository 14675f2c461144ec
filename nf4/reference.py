"""NF4 quantization written the plain way: read this file first (QLoRA, Dettmers et al. 2023, section 3).

The algorithm, for a weight ``w`` flattened and cut into blocks of ``block_size`` consecutive values:

1. absmax (eq. 1): c = max |w| over the block, stored in fp32, one per block.
2. normalise:      x = w / c, so every value of the block lies in [-1, 1].
3. nearest level:  the 4-bit code is the index of the nearest of the 16 NF4 levels (eq. 4, ``NF4_CODE``).
                   The levels are sorted, so "nearest" = how many of the 15 midpoints between
                   neighbouring levels lie strictly below x (a value on a midpoint takes the lower code).
4. pack:           two codes per byte, the first value in the high nibble: byte = (c0 << 4) | c1.
5. double quantization (section 3, "Double Quantization"): the fp32 absmax values themselves are
   quantized to 8 bits, minus their mean, in blocks of 256 (``double_quant.py``, plain already: it
   touches 1/64 of the data).

Dequantization reverses 4 and 3 and multiplies: w_hat = NF4_CODE[code] * c, in fp32, rounded once
to the output dtype.

Steps 1-3 come in two rules (``rounding=``, default: the weight's device), one per bitsandbytes kernel,
each giving that kernel's bytes (``rounding.py`` says where they differ; ``_normalise_cpu`` and
``_normalise_cuda`` below spell each out):
* ``"cpu"``: as bitsandbytes' CPU backend (tested byte for byte against it): step 2 multiplies by the
  reciprocal, x = w * (1 / c), for full blocks and divides for the last, partial block; a zero block has
  c = 0 and normalises with 1e-38 instead (x = 0, code 7), a zero partial block stores c = 1e-38; an odd
  count is padded with code 7; the thresholds are the fp32 midpoints.
* ``"cuda"``: as its CUDA kernel: subnormal inputs read as 0, every block x = w * rcp(c) with the kernel's
  reciprocal, c stored as is, the thresholds are the kernel's constants; a zero block gives NaN, code 0.

This is the definition the fast path (``fast_path.py``, what ``nf4.quantize``/``nf4.dequantize`` run)
is tested against bit for bit; it holds a few weight-sized temporaries, so it is meant for small tensors.
"""
import torch
import torch.nn.functional as F

from .checks import check_block_size, check_dtype, check_flag, check_quantized_weight, check_weight
from .codebook import NF4_CODE, NF4_MIDPOINTS
from .double_quant import dequantize_absmax, double_quant_error, quantize_absmax
from .quantized_weight import QuantizedWeight
from .rounding import check_rounding, flush_subnormals, kernel_reciprocal, thresholds

SMALLEST_ABSMAX = 1e-38  # what bitsandbytes' CPU backend normalises an all-zero block with


def nearest_code(x: torch.Tensor, boundaries: torch.Tensor = NF4_MIDPOINTS) -> torch.Tensor:
    """Step 3: the NF4 code of each x = the number of ``boundaries`` strictly below x (int64; NaN: 0).

    bitsandbytes' CUDA kernel walks a decision tree of strict ``x > threshold`` tests (``dQuantizeNF4``);
    over sorted thresholds that is this count, and a NaN, failing every test, gets code 0 in both."""
    return (x[..., None] > boundaries.to(x.device)).sum(dim=-1)


def _normalise_cpu(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2 as bitsandbytes' CPU backend: (absmax per block, x per value) of fp32 ``flat``."""
    n_full = flat.numel() // block_size * block_size
    full_blocks = flat[:n_full].view(-1, block_size)
    absmax_full = full_blocks.abs().amax(dim=1)
    x_full = full_blocks * (1.0 / absmax_full.clamp(min=SMALLEST_ABSMAX))[:, None]
    absmax, x = [absmax_full], [x_full.reshape(-1)]
    if n_full < flat.numel():  # the last, partial block
        tail = flat[n_full:]
        absmax_tail = tail.abs().amax().clamp(min=SMALLEST_ABSMAX)
        absmax.append(absmax_tail.reshape(1))
        x.append(tail / absmax_tail)
    return torch.cat(absmax), torch.cat(x)


def _normalise_cuda(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2 as bitsandbytes' CUDA kernel: (absmax per block, x per value, padded to an even count)."""
    flat = flush_subnormals(F.pad(flat, (0, flat.numel() % 2)))  # the pad is a 0 of the last block
    n_blocks = -(-flat.numel() // block_size)
    blocks = F.pad(flat, (0, n_blocks * block_size - flat.numel())).view(n_blocks, block_size)  # zeros: max unchanged
    absmax = blocks.abs().amax(dim=1)
    x = blocks * kernel_reciprocal(absmax)[:, None]  # a zero block: 0 * inf = NaN
    return absmax, x.reshape(-1)[: flat.numel()]


def blockwise_codes(flat: torch.Tensor, block_size: int, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of fp32 ``flat`` under ``rounding``: (fp32 absmax per block, int64 codes, an even count)."""
    if rounding == "cuda":
        absmax, x = _normalise_cuda(flat, block_size)
        return absmax, nearest_code(x, thresholds("cuda", flat.device))
    absmax, x = _normalise_cpu(flat, block_size)
    codes = nearest_code(x)
    return absmax, torch.cat([codes, codes.new_full((codes.numel() % 2,), 7)])  # pad: one zero, code 7


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Step 4: codes[2k] (an even count) -> uint8[k], element 2i in the high nibble, 2i+1 in the low one."""
    return (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack``: the first ``n`` codes (int64)."""
    high, low = packed.long() >> 4, packed.long() & 0xF
    return torch.stack([high, low], dim=1).reshape(-1)[:n]


def quantize_reference(w: torch.Tensor, block_size: int = 64, double_quant: bool = True,
                       rounding: str | None = None) -> QuantizedWeight:
    """Steps 1-5 for ``w`` (fp32/bf16/fp16, any shape); same result (and errors) as ``nf4.quantize``."""
    check_weight(w)
    check_block_size(block_size)
    check_flag(double_quant, "double_quant")
    rounding = check_rounding(rounding, w.device)
    flat = w.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ValueError(f"w (shape {tuple(w.shape)}) contains NaN or Inf: a block's absmax would be meaningless")
    absmax, codes = blockwise_codes(flat, block_size, rounding)                # steps 1-3
    qw = QuantizedWeight(packed=pack(codes), absmax=absmax, shape=w.shape, dtype=w.dtype,  # step 4
                         block_size=block_size)
    if double_quant:                                                           # step 5
        absmax_codes, nested_absmax, offset = quantize_absmax(absmax, rounding)
        if double_quant_error(offset, nested_absmax):
            raise ValueError(f"w (shape {tuple(w.shape)}): {double_quant_error(offset, nested_absmax)}")
        qw = qw.with_tensors(absmax=absmax_codes, nested_absmax=nested_absmax, offset=offset)
    return qw


def block_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 absmax c of every block (undoing double quantization if it was used)."""
    if qw.double_quant:
        return dequantize_absmax(qw.absmax, qw.nested_absmax, qw.offset)
    return qw.absmax


def dequantize_reference(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w_hat = NF4_CODE[code] * c(block), fp32, then one rounding to ``dtype`` (default: the original)."""
    check_quantized_weight(qw)
    dtype = qw.dtype if dtype is None else dtype
    check_dtype(dtype)
    codes = unpack(qw.packed, qw.numel)
    block = torch.arange(qw.numel, device=qw.device) // qw.block_size
    w_hat = NF4_CODE.to(qw.device)[codes] * block_absmax(qw)[block]
    return w_hat.to(dtype).view(qw.shape)
