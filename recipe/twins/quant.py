"""The quant twins: each makes the frozen base linear of one checkpoint weight.

    nf4   ``nf4.Linear4bit`` (block 64, double quantization)    ours
    bnb   bitsandbytes ``Linear4bit``, the same format          the library twin
    none  a frozen ``nn.Linear`` in the compute dtype           no quantization
"""
from __future__ import annotations

import torch
from torch import nn

import nf4


def _frozen(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def nf4_linear(weight: torch.Tensor, compute_dtype: torch.dtype) -> nn.Module:
    return nf4.Linear4bit.from_linear(_frozen(weight), block_size=64, double_quant=True, compute_dtype=compute_dtype)


def bnb_linear(weight: torch.Tensor, compute_dtype: torch.dtype) -> nn.Module:
    from .bnb_linear import bnb_linear4bit  # imports bitsandbytes: only when chosen

    return bnb_linear4bit(_frozen(weight), compute_dtype)


def plain_linear(weight: torch.Tensor, compute_dtype: torch.dtype) -> nn.Module:
    return _frozen(weight.to(compute_dtype))


QUANT = {"nf4": nf4_linear, "bnb": bnb_linear, "none": plain_linear}


def prequantized_linear(state: dict[str, torch.Tensor], quant: str, compute_dtype: torch.dtype) -> nn.Module:
    """The base linear of a checkpoint entry already stored as bitsandbytes 4-bit (packed bytes + quant
    state): kept as it is, never dequantized, so only ``--quant nf4`` (the same format) can take it."""
    if quant != "nf4":
        raise ValueError(f"a pre-quantized 4-bit checkpoint needs --quant nf4, got --quant {quant}")
    return nf4.Linear4bit.from_bnb_state_dict(state, prefix="", compute_dtype=compute_dtype)
