"""The duck-typed contract between LoRA and the frozen layer it wraps (ARCHITECTURE.md, "lora").

LoRA never imports a quantization library. A *linear-like* base is any module with ``in_features``,
``out_features`` and a ``weight`` that is one of

* a plain tensor (``nn.Linear``),
* an object with ``.dequantize(dtype=None)`` returning the ``[out, in]`` weight (the project's
  ``nf4.Linear4bit`` holds a ``QuantizedWeight``), or
* a bitsandbytes ``Params4bit``: a packed ``uint8`` tensor that carries a ``.quant_state``. It *is* a
  ``torch.Tensor`` (whose ``dequantize()`` means something else), so it is recognised first, by its
  ``quant_state``, and dequantized with ``bitsandbytes.functional.dequantize_4bit``, imported only then.

Three questions are asked of a base: give me the weight as a float tensor (`dequantized_weight`), is the
stored weight quantized (`is_quantized`), and store this float tensor as the new weight
(`replace_weight`, used by merge), which re-quantizes through the base's own quantizer.
"""
import warnings

import torch
from torch import nn


def is_linear_like(module: nn.Module) -> bool:
    """True for a module LoRA can wrap: it has ``in_features``, ``out_features`` and a ``weight``."""
    return all(hasattr(module, name) for name in ("in_features", "out_features", "weight"))


def _bnb_quant_state(weight):
    """The bitsandbytes QuantState of a Params4bit weight, or None for anything else."""
    return getattr(weight, "quant_state", None)


def is_quantized(base: nn.Module) -> bool:
    """True when the base stores its weight in a quantized form (anything but a plain float tensor)."""
    if not is_linear_like(base):
        raise TypeError(f"is_quantized: base must be linear-like (in_features, out_features, weight); got {type(base).__name__}")
    weight = base.weight
    return _bnb_quant_state(weight) is not None or not isinstance(weight, torch.Tensor)


def dequantized_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight as a ``[out_features, in_features]`` float tensor (a fresh copy when quantized).

    Nothing here records autograd history: the base is frozen, and callers use the result inside
    ``torch.no_grad()`` or a custom autograd Function's backward.
    """
    if not isinstance(base, nn.Module) or not is_linear_like(base):
        raise TypeError(f"base must be a linear-like module (in_features, out_features, weight); got {type(base).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating-point torch.dtype; got {dtype!r}")
    weight = base.weight
    quant_state = _bnb_quant_state(weight)
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit  # only reached when bitsandbytes made the base

        weight = dequantize_4bit(weight.data, quant_state)
    elif isinstance(weight, torch.Tensor):
        weight = weight.detach()
    elif callable(getattr(weight, "dequantize", None)):
        weight = weight.dequantize(dtype=dtype)  # straight into the compute dtype, no second copy
    else:
        raise TypeError(
            f"base.weight must be a tensor or have .dequantize(dtype=None); got {type(weight).__name__} "
            f"on {type(base).__name__}"
        )
    expected = (base.out_features, base.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"base weight has shape {tuple(weight.shape)}, expected [out, in] = {list(expected)}")
    return weight if dtype is None else weight.to(dtype)


@torch.no_grad()
def replace_weight(base: nn.Module, new_weight: torch.Tensor) -> None:
    """Store the float ``[out, in]`` tensor ``new_weight`` as the base weight (merge / unmerge).

    A plain tensor weight is overwritten in place, in its own dtype. A quantized weight is re-quantized
    through the base's own quantizer -- its ``set_weight(tensor)`` method (``nf4.Linear4bit`` has one), or
    for bitsandbytes a new ``Params4bit`` with the same settings -- and a warning says that this rounds,
    as PEFT warns.
    """
    weight = base.weight
    quant_state = _bnb_quant_state(weight)
    if quant_state is None and isinstance(weight, torch.Tensor):
        weight.copy_(new_weight.to(weight.dtype))
        return
    warnings.warn(
        f"merging into a quantized {type(base).__name__} re-quantizes its weight: the result is rounded "
        "to the quantization grid, so outputs can differ slightly from the unmerged adapter",
        UserWarning,
        stacklevel=3,
    )
    if quant_state is not None:  # bitsandbytes: a fresh Params4bit quantizes when moved to its device
        base.weight = type(weight)(
            new_weight.to(quant_state.dtype).cpu(),
            requires_grad=False,
            quant_type=quant_state.quant_type,
            blocksize=quant_state.blocksize,
            compress_statistics=quant_state.nested,
            quant_storage=weight.quant_storage,
        ).to(weight.device)
    elif callable(getattr(base, "set_weight", None)):
        base.set_weight(new_weight)
    else:
        raise TypeError(
            f"cannot merge into {type(base).__name__}: its weight is quantized and the base has no "
            "set_weight(tensor) method to store a new weight"
        )
