"""The trained adapter, gathered from the shards and written in PEFT's format; and read back.

``save_trained_adapter`` gathers the full LoRA tensors (``sharding.full_state_dict`` for our sharding,
``DTensor.full_tensor`` for FSDP2), then rank 0 writes them with ``lora.save_adapter`` (our LoRA) or
from PEFT's own ``LoraConfig`` (PEFT's LoRA). Either way the directory holds ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(LlamaForCausalLM(...), dir)`` loads.
``base_model_name_or_path`` records the base's directory and ``home70b_base.json`` (beside PEFT's two
files, which PEFT ignores) the base's shape, so loading the adapter onto another base fails with a
message that says so (`load_onto_base`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import llama
import lora
from lora.adapter_io import write_atomically

BASE_FILE = "home70b_base.json"


def gathered_trainable_state(built) -> dict[str, torch.Tensor] | None:
    """{name: full fp32 tensor} of every trainable tensor, on rank 0 (None elsewhere). Collective."""
    if built.sharded is not None:
        import sharding

        state = sharding.full_state_dict(built.sharded, trainable_only=True)
    else:
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
                 for n, p in built.model.named_parameters() if p.requires_grad}
    return state if dist.get_rank() == 0 else None


def _base_fingerprint(model_dir) -> dict:
    config = llama.LlamaConfig.from_hf(model_dir)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    return {k: getattr(config, k) for k in keys}


def _with_tensors(model: nn.Module, state: dict[str, torch.Tensor]):
    """Point each named (possibly sharded-away) attribute at the gathered tensor, for lora.save_adapter."""
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            setattr(module, attr, tensor)


def save_trained_adapter(built, args, directory: Path) -> Path | None:
    state = gathered_trainable_state(built)
    if dist.get_rank() != 0:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = str(Path(args.model).resolve())
    if args.lora == "ours":
        _with_tensors(built.model, state)
        lora.save_adapter(built.model, directory, base_model_name_or_path=base)
    else:
        import peft

        config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, use_dora=args.dora,
                                 target_modules=sorted({n.split(".lora_")[0] for n in state}),
                                 base_model_name_or_path=base).to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        config["peft_type"], config["task_type"] = "LORA", None
        tensors = {"base_model.model." + k.replace(".default", ""): v.contiguous() for k, v in state.items()}
        write_atomically(directory / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))
        write_atomically(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    shape = json.dumps(_base_fingerprint(args.model), indent=1) + "\n"
    write_atomically(directory / BASE_FILE, lambda tmp: Path(tmp).write_text(shape))
    return directory


def load_onto_base(model_dir, adapter_dir, dtype=torch.float32) -> llama.Llama:
    """The plain (unquantized) base of ``model_dir`` with the adapter of ``adapter_dir`` loaded.

    An adapter trained on a base of another shape is refused with a ValueError naming both shapes."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    shape_file, actual = Path(adapter_dir) / BASE_FILE, _base_fingerprint(model_dir)
    recorded = json.loads(shape_file.read_text()) if shape_file.is_file() else None
    if recorded is not None and recorded != actual:
        differ = {k: (recorded.get(k), v) for k, v in actual.items() if recorded.get(k) != v}
        raise ValueError(f"adapter {adapter_dir} was trained on another base ({config.get('base_model_name_or_path')}):"
                         f" (adapter's, this base's) = {differ}")
    model = llama.load_checkpoint(None, model_dir).to(dtype)
    lora.load_adapter(model, adapter_dir)
    return model

