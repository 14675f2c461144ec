"""Put LoRA into a model: wrap the targeted linear layers in place, freeze the rest; merge; count.

Target patterns follow PEFT's ``target_modules``:

* ``"all-linear"``: every linear-like module (``nn.Linear``, a 4-bit linear, ...), minus ``exclude``;
* any other string: a regular expression that must match the *whole* module name
  (``r".*\\.(q|v)_proj"``);
* a list: an entry matches a module whose name equals it or ends with ``"." + entry``
  (``["q_proj", "v_proj"]`` or ``["model.layers.0.mlp.up_proj"]``).

``exclude`` (default ``("lm_head",)``, the output layer, which PEFT's ``all-linear`` skips too) uses the
list rule. A pattern that matches no linear-like module is an error that names it: a typo must not
silently train nothing.
"""
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .base_weight import is_linear_like, is_quantized
from .layer import LoRALinear, check_hyperparameters


def _matches_entry(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def check_model(model, caller: str) -> None:
    """TypeError unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module; got {type(model).__name__}")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every `LoRALinear` in ``model`` with its module name."""
    check_model(model, "lora_layers")
    return ((name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear))


def _candidates(model: nn.Module) -> list[str]:
    """Names of the linear-like modules that could be wrapped (not LoRA's own pieces, not wrapped ones)."""
    inside_lora = [name + "." for name, _ in lora_layers(model)]
    return [name for name, module in model.named_modules()
            if name and is_linear_like(module) and not isinstance(module, LoRALinear)
            and not any(name.startswith(prefix) for prefix in inside_lora)]


def select_targets(model: nn.Module, target_modules: str | Sequence[str], exclude: Sequence[str] = ("lm_head",)) -> list[str]:
    """The module names ``target_modules`` selects (module docstring); ValueError for a pattern matching nothing."""
    check_model(model, "select_targets")
    if isinstance(exclude, str) or not isinstance(exclude, Sequence) or not all(isinstance(e, str) for e in exclude):
        raise TypeError(f"exclude must be a list/tuple of names; got {exclude!r}")
    names = [n for n in _candidates(model) if not any(_matches_entry(n, e) for e in exclude)]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            selected = names
        else:
            try:
                pattern = re.compile(target_modules)
            except re.error as err:
                raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression ({err})") from None
            selected = [n for n in names if pattern.fullmatch(n)]
        unmatched = [] if selected else [target_modules]
    elif isinstance(target_modules, Sequence) and target_modules and all(isinstance(t, str) for t in target_modules):
        selected = [n for n in names if any(_matches_entry(n, t) for t in target_modules)]
        unmatched = [t for t in target_modules if not any(_matches_entry(n, t) for n in names)]
    else:
        raise TypeError(f"target_modules must be 'all-linear', a regex string or a non-empty list of names; "
                        f"got {target_modules!r}")
    if unmatched:
        raise ValueError(f"target_modules pattern(s) {unmatched} match no linear-like module (after exclude="
                         f"{list(exclude)}); candidates include {names[:8]}")
    return selected


def inject(model: nn.Module, target_modules: str | Sequence[str] = "all-linear", r: int = 8, alpha: float = 8,
           dropout: float = 0.0, rslora: bool = False, dora: bool = False, exclude: Sequence[str] = ("lm_head",),
           **layer_kwargs) -> list[str]:
    """Wrap every selected module of ``model`` in a `LoRALinear`, in place; freeze every other parameter.

    Returns the wrapped module names. ``layer_kwargs`` go to `LoRALinear` (e.g. ``dtype``).
    """
    check_hyperparameters(r, alpha, dropout, rslora, dora, layer_kwargs.get("dtype", torch.float32))
    targets = select_targets(model, target_modules, exclude)
    too_small = [n for n in targets if r > min(model.get_submodule(n).in_features, model.get_submodule(n).out_features)]
    if too_small:
        raise ValueError(f"r={r} exceeds min(in_features, out_features) of {too_small[:4]}; choose r <= the smaller side")
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), r=r, alpha=alpha, dropout=dropout,
                                               rslora=rslora, dora=dora, **layer_kwargs))
    for _, layer in lora_layers(model):  # adapters from this call and any earlier one stay trainable
        for parameter in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector):
            if parameter is not None:
                parameter.requires_grad_(True)
    return targets


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (`LoRALinear.merge`); forward then skips the adapters."""
    check_model(model, "merge")
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge` on every adapter."""
    check_model(model, "unmerge")
    for _, layer in lora_layers(model):
        layer.unmerge()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require a gradient (after `inject`: the adapters), ready for an optimizer."""
    check_model(model, "trainable_parameters")
    return [p for p in model.parameters() if p.requires_grad]


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || " \
               f"trainable%: {100 * self.trainable / max(self.total, 1):.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts, a quantized weight counted as its ``out * in`` values.

    (Its packed storage holds two 4-bit values per byte; PEFT likewise counts a 4-bit weight as 2 x its
    uint8 elements.) Shared (tied) tensors are counted once.
    """
    check_model(model, "count_parameters")
    seen, trainable, total = set(), 0, 0
    for module in model.modules():  # modules() yields a shared module once
        if is_linear_like(module) and not isinstance(module, LoRALinear) and is_quantized(module):
            seen |= {id(p) for p in module.parameters()}
            bias = getattr(module, "bias", None)
            total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)
