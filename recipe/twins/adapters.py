"""The LoRA twins: each wraps the target linears of a module with LoRA and returns the wrapped names.

    ours  ``lora.inject``                     our ``LoRALinear`` (LoRA, DoRA)
    peft  ``peft.inject_adapter_in_model``    PEFT's LoRA layers, over our NF4 linear too

Both draw A from the same Kaiming-uniform bound and B = 0; `reset_lora_init` then re-draws every A from
(seed, module name), so every rank and both twins start from the same adapter.
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
from torch import nn

import lora
import nf4

if TYPE_CHECKING:
    from ..build import BuildOptions

PEFT_PREFIX = "base_model.model."


def inject_ours(module: nn.Module, opts: BuildOptions) -> list[str]:
    return lora.inject(module, target_modules=list(opts.target_modules), r=opts.rank, alpha=opts.alpha,
                       dropout=opts.dropout, dora=opts.dora)


def inject_peft(module: nn.Module, opts: BuildOptions) -> list[str]:
    import peft

    config = peft.LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, use_dora=opts.dora,
                             target_modules=list(opts.target_modules), init_lora_weights=True)
    # PEFT's LoRA over our NF4 linear. PEFT has no public way to map a layer class it does not know to one
    # of its LoRA layers: its guide for custom models ("Custom models", experimental) documents this method.
    config._register_custom_module({nf4.Linear4bit: peft.tuners.lora.layer.Linear})
    lora.select_targets(module, list(opts.target_modules))  # the same clear error for a pattern matching nothing
    peft.inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return [n for n, m in module.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A")]


LORA = {"ours": inject_ours, "peft": inject_peft}


def adapter_key(name: str) -> str:
    """A LoRA tensor's name as our LoRA spells it: PEFT's adapter level (``.default``) and model prefix
    (``base_model.model.``) removed; our own names are returned unchanged."""
    return name.replace(".default", "").removeprefix(PEFT_PREFIX)


@torch.no_grad()
def reset_lora_init(model: nn.Module, seed: int, prefix: str = "") -> None:
    """Re-draw every LoRA A from (seed, module name): U(-1/sqrt(in), 1/sqrt(in)), B stays zero.

    prefix: ``model``'s own name in the whole model (``"model.layers.3."`` for one decoder layer)."""
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_A." in name and name.endswith("weight"):
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(adapter_key(prefix + name).encode()))
            bound = 1 / p.shape[1] ** 0.5
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).to(p.dtype))
