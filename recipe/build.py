"""Build the model to train: meta -> for each decoder layer: load, quantize, add LoRA -> shard.

    built = build(BuildOptions(quant="nf4", lora="ours", shard="ours"))      # the bundled tiny-llama
    loss = built.forward(ids, labels=ids)[1]; loss.backward(); AdamW(built.parameters)...

The model is created on the ``meta`` device (no memory), then the checkpoint is streamed one decoder
layer at a time (``llama.iter_checkpoint``): each tensor is moved to the rank's device as it arrives
(``BuildOptions.device``: its GPU, or the CPU), each linear is quantized to NF4 there and the bf16/fp32
source is dropped, the target linears get LoRA adapters, the norms are cast to the compute
dtype, and the layer is sharded before the next one is read (every decoder layer, and the embedding
and lm_head, is a sharding unit). So while loading a rank holds its own shards plus about one layer.

Each component has a library twin (``recipe/twins``), chosen by one option, so one swap at a time can
be compared: ``quant`` nf4 | bnb | none, ``lora`` ours | peft, ``shard`` ours | hybrid | fsdp2 |
fsdp2-hybrid | none (``shard_size``: ranks per shard group of the hybrid ones, default one node). This file
does the same thing whichever is chosen; the twins differ only behind their interface.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import llama
from llama.pretrain import BUNDLED_MODEL

from .device import device_peak_mib, reset_device_peak
from .memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from .plan import ALL_LINEAR
from .twins import LORA, QUANT, SHARDERS, TrainableModel, prequantized_linear, reset_lora_init
from .twins.sharders import HYBRID

DEFAULT_MODEL = BUNDLED_MODEL
CHOICES = {"quant": tuple(QUANT), "lora": tuple(LORA), "shard": tuple(SHARDERS)}


@dataclasses.dataclass
class BuildOptions:
    model: str | Path = DEFAULT_MODEL
    quant: str = "nf4"
    lora: str = "ours"
    shard: str = "ours"
    shard_size: int | None = None  # hybrid shards: ranks per shard group (default: torchrun's LOCAL_WORLD_SIZE)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dora: bool = False
    target_modules: tuple[str, ...] = ALL_LINEAR
    compute_dtype: torch.dtype = torch.float32
    offload: bool = False
    seed: int = 0
    device: torch.device | str = "cpu"  # where the model computes (``recipe.device.resolve_device``)

    def __post_init__(self):
        self.device = torch.device(self.device)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.shard_size is not None and self.shard not in HYBRID:
            raise ValueError(f"--shard-size is for --shard {' or '.join(HYBRID)}, got --shard {self.shard}")
        if self.shard_size is not None and (isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int)
                                            or self.shard_size < 1):
            raise ValueError(f"--shard-size must be a positive integer, got {self.shard_size!r}")
        if self.shard.startswith("fsdp2") and self.quant == "bnb":
            raise ValueError("--quant bnb with --shard fsdp2 is not supported: FSDP2 would shard bitsandbytes' "
                             "Params4bit and lose its quant_state (swap one component at a time)")
        if self.lora == "peft" and self.dora and self.quant != "none":
            raise ValueError("--lora peft --dora needs --quant none here (PEFT's DoRA reads the weight itself)")


@dataclasses.dataclass
class Built:
    trainable: TrainableModel   # what the loop calls: forward, parameters, clipping, state
    lora_names: list[str]       # the wrapped linears, by module name
    device: torch.device
    load_peak_rss: int          # bytes: the RSS high-water mark while loading, quantizing and sharding
    rss_before_load: int
    load_peak_device_mib: float | None  # the GPU's allocated high-water mark while loading (None on CPU)
    description: str = ""       # the stack in words, for the log

    @property
    def model(self) -> nn.Module:
        """The Llama, with quantized linears and LoRA layers."""
        return self.trainable.model

    @property
    def forward(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
        return self.trainable.forward

    @property
    def parameters(self) -> list[torch.Tensor]:
        return self.trainable.parameters()


def _to_device(value, device: torch.device):
    """A checkpoint entry (a tensor, or a pre-quantized bitsandbytes state dict) on ``device``."""
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


def _frozen_linear(value, opts: BuildOptions) -> nn.Module:
    if isinstance(value, dict):  # pre-quantized bitsandbytes checkpoint: never dequantized
        return prequantized_linear(value, opts.quant, opts.compute_dtype)
    return QUANT[opts.quant](value, opts.compute_dtype)


def _load_tensors(model: llama.Llama, tensors: dict, opts: BuildOptions) -> None:
    """Put checkpoint tensors into the meta model: moved to ``opts.device``, then linears quantized there
    (``opts.quant``) and the rest cast. Empties ``tensors`` as it goes: the checkpoint stream holds that
    dict too, so each source tensor is freed as soon as it is converted, not when the next layer is read."""
    for name in list(tensors):
        value = _to_device(tensors.pop(name), opts.device)  # one source tensor at a time, freed once converted
        module_name, _, attr = name.rpartition(".")
        parent_name, _, child = module_name.rpartition(".")
        if child in ALL_LINEAR:
            setattr(model.get_submodule(parent_name), child, _frozen_linear(value, opts))
        else:
            setattr(model.get_submodule(module_name), attr,
                    nn.Parameter(value.to(opts.compute_dtype), requires_grad=False))


def start_loading(opts: BuildOptions) -> tuple[llama.Llama, Iterator]:
    """The model on meta with its non-layer tensors loaded (embeddings, final norm, lm_head), and the
    checkpoint stream positioned at decoder layer 0 (``llama.iter_checkpoint``)."""
    config = llama.LlamaConfig.from_hf(opts.model)
    with torch.device("meta"):
        model = llama.Llama(config)
    stream = llama.iter_checkpoint(opts.model, config)
    _, tensors = next(stream)  # the non-layer group comes first
    _load_tensors(model, tensors, opts)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, stream


def load_next_layer(model: llama.Llama, stream: Iterator, opts: BuildOptions) -> list[str]:
    """Read the next decoder layer from ``stream``: quantize its linears, wrap the targets with LoRA,
    draw LoRA A from (seed, name); only LoRA stays trainable. Returns the wrapped modules' names."""
    index, tensors = next(stream)
    _load_tensors(model, tensors, opts)
    layer, prefix = model.model.layers[index], f"model.layers.{index}."
    names = [prefix + n for n in LORA[opts.lora](layer, opts)]
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
        if p.requires_grad:  # ours creates adapters beside the base weight; make sure PEFT's are there too
            p.data = p.data.to(opts.device)
    reset_lora_init(layer, opts.seed, prefix=prefix)
    return names


def build(opts: BuildOptions, process_group=None) -> Built:
    """Load, quantize, add LoRA and shard the model of ``opts``; measure the memory peak while doing it.

    Layer by layer: the sharder (``opts.shard``) asks for each decoder layer in turn, and it is loaded,
    quantized and wrapped then, so while loading a rank holds its shards plus about one layer in full (a
    70B does not fit whole in one rank's CPU memory, even in NF4). The embedding and lm_head come first.
    """
    if opts.shard != "none" and not dist.is_initialized():
        raise ValueError(f"--shard {opts.shard} needs torch.distributed initialised (use torchrun)")
    rss_before = current_rss_bytes()
    reset_peak_rss()
    reset_device_peak(opts.device)
    model, stream = start_loading(opts)
    # tied weights must stay in one unit: then both live in the root
    ends = [] if model.config.tie_word_embeddings else [model.model.embed_tokens, model.lm_head]
    lora_names = []
    trainable = SHARDERS[opts.shard](model, ends, list(model.model.layers),
                                     lambda layer: lora_names.extend(load_next_layer(model, stream, opts)),
                                     opts, process_group)
    description = (f"{opts.quant} base, {opts.lora} LoRA (r={opts.rank}, {len(lora_names)} layers), "
                   f"{opts.shard} sharding" + (f" (shard size {opts.shard_size})" if opts.shard_size else ""))
    return Built(trainable, lora_names, opts.device, peak_rss_bytes(), rss_before, device_peak_mib(opts.device),
                 description)
