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

Three details make the bytes identical to bitsandbytes' ``quantize_4bit`` on CPU (tested):
* step 2 multiplies by the reciprocal, x = w * (1 / c), for full blocks, and divides for the last,
  partial block; both in fp32 (the weight is first converted to fp32);
* a block of zeros has c = 0: full blocks store 0 (and normalise with 1e-38 instead, giving x = 0);
  a partial last block stores c = 1e-38;
* an odd number of values is padded with one zero (code 7, the exact zero level).

This is the definition the fast path (``fast_path.py``, what ``nf4.quantize``/``nf4.dequantize`` run)
is tested against bit for bit; it holds a few weight-sized temporaries, so it is meant for small tensors.
"""
import torch

from .checks import check_block_size, check_dtype, check_flag, check_quantized_weight, check_weight
from .codebook import NF4_CODE
from .double_quant import dequantize_absmax, double_quant_error, quantize_absmax
from .quantized_weight import QuantizedWeight

NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # 15 decision boundaries between the 16 levels
SMALLEST_ABSMAX = 1e-38  # what bitsandbytes normalises an all-zero block with


def nearest_code(x: torch.Tensor) -> torch.Tensor:
    """Step 3: the NF4 code of each x in [-1, 1] = the number of midpoints strictly below x (int64)."""
    return (x[..., None] > NF4_MIDPOINTS.to(x.device)).sum(dim=-1)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Step 4: codes[2k] (an even count) -> uint8[k], element 2i in the high nibble, 2i+1 in the low one."""
    return (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack``: the first ``n`` codes (int64)."""
    high, low = packed.long() >> 4, packed.long() & 0xF
    return torch.stack([high, low], dim=1).reshape(-1)[:n]


def quantize_reference(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """Steps 1-5 for ``w`` (fp32/bf16/fp16, any shape); same result (and errors) as ``nf4.quantize``."""
    check_weight(w)
    check_block_size(block_size)
    check_flag(double_quant, "double_quant")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    n_full = n // block_size * block_size
    full_blocks = flat[:n_full].view(-1, block_size)
    absmax_full = full_blocks.abs().amax(dim=1)                                # step 1
    x_full = full_blocks * (1.0 / absmax_full.clamp(min=SMALLEST_ABSMAX))[:, None]  # step 2
    absmax, x = [absmax_full], [x_full.reshape(-1)]
    if n_full < n:  # the last, partial block
        tail = flat[n_full:]
        absmax_tail = tail.abs().amax().clamp(min=SMALLEST_ABSMAX)
        absmax.append(absmax_tail.reshape(1))
        x.append(tail / absmax_tail)
    absmax, x = torch.cat(absmax), torch.cat(x)
    if not torch.isfinite(absmax).all():
        raise ValueError(f"w (shape {tuple(w.shape)}) contains NaN or Inf: a block's absmax would be meaningless")
    codes = nearest_code(x)                                                    # step 3
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])  # pad: one zero, code 7
    qw = QuantizedWeight(packed=pack(codes), absmax=absmax, shape=w.shape, dtype=w.dtype,  # step 4
                         block_size=block_size)
    if double_quant:                                                           # step 5
        absmax_codes, nested_absmax, offset = quantize_absmax(absmax)
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
