"""The two lookup tables of NF4 with double quantization.

* ``NF4_CODE``: the 16 levels of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, section 3, eq. 4),
  exactly the fp32 table bitsandbytes ships (``bitsandbytes.functional.get_4bit_type("nf4")``).
  ``nf4_code_from_normal()`` derives the same numbers from quantiles of N(0, 1).
* ``NF4_MIDPOINTS`` and ``NF4_CUDA_THRESHOLDS``: the 15 decision boundaries between neighbouring levels,
  as bitsandbytes' CPU backend and its CUDA kernel write them (four differ by one fp32 ulp; ``rounding.py``).
* ``dynamic_code()``: the signed 8-bit "dynamic" map of bitsandbytes (Dettmers 2016, "8-Bit
  Approximations for Parallelism in Deep Learning"), used to store the per-block absmax constants
  in 8 bits (QLoRA's double quantization, section 3, "Double Quantization").
"""
from fractions import Fraction

import torch

# bitsandbytes' published NF4 table, index = the 4-bit code.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# The midpoints computed in fp32: what bitsandbytes' CPU backend compares with (``torch.bucketize``).
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def _fp32_nearest_to_decimal(text: str) -> float:
    """The fp32 value nearest to the decimal ``text``, rounded once (as a C compiler reads ``0.5f``), not via fp64."""
    exact = Fraction(text)
    guess = torch.tensor(float(exact), dtype=torch.float32)
    candidates = [torch.nextafter(guess, torch.tensor(-1.0)), guess, torch.nextafter(guess, torch.tensor(2.0))]
    return min(candidates, key=lambda c: abs(Fraction(c.item()) - exact)).item()


def nf4_cuda_thresholds() -> torch.Tensor:
    """The 15 thresholds of bitsandbytes' CUDA decision tree (``dQuantizeNF4`` in its ``csrc`` kernels), fp32.

    The kernel writes them as float literals: the midpoints computed in fp64 from the fp32 levels, printed as
    the shortest decimal that reads back as that fp64 number (Python's ``repr``), each rounded by the
    compiler straight to fp32. Rounding the decimal once is not rounding the fp64 midpoint: four of the
    midpoints are exact fp32 ties, and their 16-17 digit decimals fall just off the tie, so four thresholds
    are one ulp away from ``NF4_MIDPOINTS`` (indices 0, 8, 12, 14; the constants of bitsandbytes 0.50.2's
    compiled sm_90 kernel, checked in the tests).
    """
    levels = NF4_CODE.double()
    midpoints = ((levels[:-1] + levels[1:]) / 2).tolist()
    return torch.tensor([_fp32_nearest_to_decimal(repr(m)) for m in midpoints], dtype=torch.float32)


NF4_CUDA_THRESHOLDS = nf4_cuda_thresholds()


def nf4_code_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """The NF4 levels from N(0, 1) quantiles (QLoRA eq. 4), normalised to [-1, 1].

    An information-theoretically optimal k-bit code for N(0, 1) data puts equally many values in
    every bin, i.e. its levels are quantiles. To also represent an exact zero, NF4 is asymmetric:
    8 positive levels at the quantiles ``linspace(offset, 0.5, 9)[:-1]``, 7 negative levels at
    ``linspace(offset, 0.5, 8)[:-1]`` (mirrored), and 0. ``offset`` = 0.9677083 (the outermost
    quantile, about 1.85 sigma) is bitsandbytes' choice. Divided by the largest value, so that the
    ends are exactly -1 and +1 (the block's absmax maps onto them).
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.max()).to(torch.float32)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``), 256 sorted fp32 values.

    One sign bit, then a run of zero bits whose length is a decimal exponent (10^-6 .. 10^0), then
    the remaining bits are a linear fraction: for exponent i (0..6) there are 2^i fraction steps,
    whose values are the bin centres of ``linspace(0.1, 1, 2^i + 1)`` times 10^(i-6). Small
    magnitudes get few, widely spaced levels, large ones many: 127 positive + 127 negative
    levels, plus 0 and 1.0 = 256.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        levels += [scale * centres, -scale * centres]
    return torch.cat(levels).sort().values
