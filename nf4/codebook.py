"""The two lookup tables of NF4 with double quantization.

* ``NF4_CODE``: the 16 levels of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, section 3, eq. 4),
  exactly the fp32 table bitsandbytes ships (``bitsandbytes.functional.get_4bit_type("nf4")``).
  ``nf4_code_from_normal()`` derives the same numbers from quantiles of N(0, 1).
* ``dynamic_code()``: the signed 8-bit "dynamic" map of bitsandbytes (Dettmers 2016, "8-Bit
  Approximations for Parallelism in Deep Learning"), used to store the per-block absmax constants
  in 8 bits (QLoRA's double quantization, section 3, "Double Quantization").
"""
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
