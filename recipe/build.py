"""Build the model to train: meta -> for each decoder layer: load, quantize, add LoRA -> shard.

    built = build(BuildOptions(model="assets/tiny-llama", quant="nf4", lora="ours", shard="ours"))
    loss = built.forward(ids, labels=ids)[1]; loss.backward(); AdamW(built.parameters)...

The model is created on the ``meta`` device (no memory), then the checkpoint is streamed one decoder
layer at a time (``llama.iter_checkpoint``): each tensor is moved to the rank's device as it arrives
(``BuildOptions.device``: its GPU, or the CPU), each linear is quantized to NF4 there and the bf16/fp32
source is dropped, the target linears get LoRA adapters, the norms are cast to the compute
dtype, and the layer is sharded before the next one is read (every decoder layer, and the embedding
and lm_head, is a sharding unit). So while loading a rank holds its own shards plus about one layer.

Each component has a library twin, chosen by one option, so one swap at a time can be compared:

    quant  nf4  ``nf4.Linear4bit``            bnb   bitsandbytes ``Linear4bit``     none  frozen nn.Linear
    lora   ours ``lora.inject``               peft  PEFT's LoRA layers (``inject_adapter_in_model``)
    shard  ours ``sharding.shard_model``      fsdp2 PyTorch ``fully_shard``          none  data parallel

LoRA's A matrices are re-drawn from ``seed`` and the module name (Kaiming-uniform, bound 1/sqrt(in),
what both LoRA implementations draw), so every rank and every variant starts from the same adapter.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import llama
import lora
import nf4
import sharding

from .device import device_peak_mib, reset_device_peak
from .memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHOICES = {"quant": ("nf4", "bnb", "none"), "lora": ("ours", "peft"), "shard": ("ours", "fsdp2", "none")}


@dataclasses.dataclass
class BuildOptions:
    model: str | Path = DEFAULT_MODEL
    quant: str = "nf4"
    lora: str = "ours"
    shard: str = "ours"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dora: bool = False
    target_modules: tuple[str, ...] = LINEARS
    compute_dtype: torch.dtype = torch.float32
    offload: bool = False
    seed: int = 0
    device: torch.device | str = "cpu"  # where the model computes (``recipe.device.resolve_device``)

    def __post_init__(self):
        self.device = torch.device(self.device)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.shard == "fsdp2" and self.quant == "bnb":
            raise ValueError("--quant bnb with --shard fsdp2 is not supported: FSDP2 would shard bitsandbytes' "
                             "Params4bit and lose its quant_state (swap one component at a time)")
        if self.lora == "peft" and self.dora and self.quant != "none":
            raise ValueError("--lora peft --dora needs --quant none here (PEFT's DoRA reads the weight itself)")


@dataclasses.dataclass
class Built:
    model: nn.Module            # the Llama, with quantized linears and LoRA layers
    forward: object             # call this: the sharded wrapper, or the model
    parameters: list            # what the optimizer steps (local master shards under sharding)
    sharded: object | None      # sharding.ShardedModel for --shard ours
    lora_names: list[str]
    load_peak_rss: int          # bytes: the RSS high-water mark while loading, quantizing and sharding
    rss_before_load: int
    device: torch.device
    load_peak_device_mib: float | None  # the GPU's allocated high-water mark while loading (None on CPU)


class ShardableBnbLinear4bit:
    """Mixin-built subclass of bitsandbytes ``Linear4bit`` (see `bnb_linear4bit`): when a sharder replaces
    the packed weight by a plain uint8 view, reading ``.weight`` re-attaches the module's ``QuantState``
    to it -- what bitsandbytes' own ``fix_4bit_weight_quant_state_from_module`` does for FSDP, without
    re-registering a Parameter the sharder would then fail to overwrite."""

    @property
    def weight(self):
        w = self._parameters["weight"] if "weight" in self._parameters else self.__dict__.get("_sharded_weight")
        if w is None:
            raise AttributeError("weight")
        if getattr(w, "quant_state", None) is None and getattr(self, "quant_state", None) is not None:
            w.quant_state = self.quant_state
        return w

    @weight.setter
    def weight(self, value):
        self.__dict__["_sharded_weight"] = value


@functools.cache
def _shardable_bnb_class():
    bnb = __import__("bitsandbytes")  # only --quant bnb needs it
    return type("ShardableBnbLinear4bit", (ShardableBnbLinear4bit, bnb.nn.Linear4bit), {})


def bnb_linear4bit(weight: torch.Tensor, compute_dtype: torch.dtype, block_size: int = 64) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` (double quantization) holding ``weight``, quantized on its device."""
    bnb = __import__("bitsandbytes")
    cls = _shardable_bnb_class()
    out_features, in_features = weight.shape
    with torch.device("meta"):
        module = cls(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                     compress_statistics=True, quant_type="nf4")
    module.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, blocksize=block_size,
                                      compress_statistics=True, quant_type="nf4", module=module)
    module.weight = module.weight.to(weight.device)  # Params4bit quantizes when moved to a device
    module.support_avx512bf16_for_cpu = False  # never repack the bytes in place at eval time
    return module


def frozen_linear_module(weight, quant: str, compute_dtype: torch.dtype) -> nn.Module:
    """The frozen base linear for one checkpoint entry (a tensor, or a bitsandbytes 4-bit state dict)."""
    if isinstance(weight, dict):  # pre-quantized bitsandbytes checkpoint: never dequantized
        if quant != "nf4":
            raise ValueError("a pre-quantized 4-bit checkpoint needs --quant nf4")
        return nf4.Linear4bit.from_bnb_state_dict(weight, prefix="", compute_dtype=compute_dtype)
    if quant == "nf4":
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return nf4.Linear4bit.from_linear(linear, block_size=64, double_quant=True, compute_dtype=compute_dtype)
    if quant == "bnb":
        return bnb_linear4bit(weight, compute_dtype)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.to(compute_dtype), requires_grad=False)
    return linear


def add_lora(module: nn.Module, opts: BuildOptions) -> list[str]:
    """Wrap ``opts.target_modules`` inside ``module`` with LoRA (ours or PEFT's); return the wrapped names."""
    if opts.lora == "ours":
        return lora.inject(module, target_modules=list(opts.target_modules), r=opts.rank, alpha=opts.alpha,
                           dropout=opts.dropout, dora=opts.dora)
    peft = __import__("peft")
    config = peft.LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, use_dora=opts.dora,
                             target_modules=list(opts.target_modules), init_lora_weights=True)
    config._register_custom_module({nf4.Linear4bit: peft.tuners.lora.layer.Linear})  # PEFT's LoRA over our NF4
    lora.select_targets(module, list(opts.target_modules))  # the same clear error for a pattern matching nothing
    peft.inject_adapter_in_model(config, module)
    module.requires_grad_(False)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return [n for n, m in module.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A")]


@torch.no_grad()
def reset_lora_init(model: nn.Module, seed: int, prefix: str = "") -> None:
    """Re-draw every LoRA A from (seed, module name): U(-1/sqrt(in), 1/sqrt(in)), B stays zero.

    prefix: ``model``'s own name in the whole model (``"model.layers.3."`` for one decoder layer)."""
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_A." in name and name.endswith("weight"):
            key = prefix + name.replace(".default", "").removeprefix("base_model.model.")  # PEFT's names -> ours
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            bound = 1 / p.shape[1] ** 0.5
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).to(p.dtype))


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor.to(dtype), requires_grad=False))


def _to_device(value, device: torch.device):
    """A checkpoint entry (a tensor, or a pre-quantized bitsandbytes state dict) on ``device``."""
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


def _load_tensors(model: llama.Llama, tensors: dict, opts: BuildOptions) -> None:
    """Put checkpoint tensors into the meta model: moved to ``opts.device``, then linears quantized there
    (``opts.quant``) and the rest cast. Empties ``tensors`` as it goes: the checkpoint stream holds that
    dict too, so each source tensor is freed as soon as it is converted, not when the next layer is read."""
    for name in list(tensors):
        value = _to_device(tensors.pop(name), opts.device)  # one source tensor at a time, freed once converted
        module_name = name.rpartition(".")[0]
        if module_name.rsplit(".", 1)[-1] in LINEARS:
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, frozen_linear_module(value, opts.quant, opts.compute_dtype))
        else:
            _set_tensor(model, name, value, opts.compute_dtype)


def start_loading(opts: BuildOptions):
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


def load_next_layer(model: llama.Llama, stream, opts: BuildOptions) -> list[str]:
    """Read the next decoder layer from ``stream``: quantize its linears, wrap the targets with LoRA,
    draw LoRA A from (seed, name); only LoRA stays trainable. Returns the wrapped modules' names."""
    index, tensors = next(stream)
    _load_tensors(model, tensors, opts)
    layer, prefix = model.model.layers[index], f"model.layers.{index}."
    names = [prefix + n for n in add_lora(layer, opts)]
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
        if p.requires_grad:  # ours creates adapters beside the base weight; make sure PEFT's are there too
            p.data = p.data.to(opts.device)
    reset_lora_init(layer, opts.seed, prefix=prefix)
    return names


def nf4_tensors_as_buffers(model: nn.Module) -> None:
    """For FSDP2: re-register nf4.Linear4bit's frozen uint8/fp32 tensors as buffers, which FSDP2 leaves
    unsharded (replicated). FSDP2 refuses 0-dim parameters (the absmax offset) and gathers each unit's
    parameters in one dtype -- the reason FSDP1 + QLoRA stored 4-bit bytes as bf16 (chapter 5); our
    sharding flattens one buffer per dtype instead."""
    for module in model.modules():
        if isinstance(module, nf4.Linear4bit):
            for name in [n for n, p in module._parameters.items() if n.startswith("weight_") and p is not None]:
                module.register_buffer(name, module._parameters.pop(name).data)


def _fsdp2_sharder(opts: BuildOptions):
    """``fully_shard`` with ``opts``' mixed precision and offload (FSDP2 shards a module at this call)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(opts.device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=opts.compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if opts.offload else OffloadPolicy()

    def shard_one(module):
        nf4_tensors_as_buffers(module)
        fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return shard_one


def load_and_shard(opts: BuildOptions, process_group=None):
    """(model, forward callable, optimizer parameters, ShardedModel or None, LoRA names) for ``opts``.

    Layer by layer: each decoder layer is loaded, quantized and wrapped, then sharded before the next
    one is read, so while loading a rank holds its shards plus about one layer in full (a 70B does
    not fit whole in one rank's CPU memory, even in NF4). The embedding and lm_head are sharded first.
    ``--shard ours`` lets ``sharding.shard_model`` pull each layer through its ``materialize``
    callback; FSDP2 shards a module when ``fully_shard`` is called on it; ``--shard none`` keeps all.
    """
    model, stream = start_loading(opts)
    layers, lora_names = list(model.model.layers), []
    # tied weights must stay in one unit: then both live in the root
    ends = [] if model.config.tie_word_embeddings else [model.model.embed_tokens, model.lm_head]
    if opts.shard == "ours":
        def materialize(unit):
            if unit not in ends:  # a decoder layer (the ends are loaded already)
                lora_names.extend(load_next_layer(model, stream, opts))

        sharded = sharding.shard_model(model, ends + layers, process_group=process_group,
                                       compute_dtype=opts.compute_dtype, reduce_dtype=torch.float32,
                                       offload=opts.offload, materialize=materialize)
        return model, sharded, sharded.parameters(), sharded, lora_names
    fsdp2 = _fsdp2_sharder(opts) if opts.shard == "fsdp2" else None
    for unit in ends if fsdp2 else []:
        fsdp2(unit)
    for layer in layers:
        lora_names += load_next_layer(model, stream, opts)
        if fsdp2:
            fsdp2(layer)
    if fsdp2:
        fsdp2(model)
    return model, model, [p for p in model.parameters() if p.requires_grad], None, lora_names


def build(opts: BuildOptions, process_group=None) -> Built:
    """Load, quantize, add LoRA and shard the model of ``opts``; measure the RSS peak while doing it."""
    if opts.shard != "none" and not dist.is_initialized():
        raise ValueError(f"--shard {opts.shard} needs torch.distributed initialised (use torchrun)")
    rss_before = current_rss_bytes()
    reset_peak_rss()
    reset_device_peak(opts.device)
    model, forward, params, sharded, lora_names = load_and_shard(opts, process_group)
    return Built(model, forward, params, sharded, lora_names, peak_rss_bytes(), rss_before, opts.device,
                 device_peak_mib(opts.device))
