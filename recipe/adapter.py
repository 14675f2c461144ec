"""The trained adapter, gathered from the shards and written in PEFT's format; and read back.

``save_trained_adapter`` gathers the full LoRA tensors (``TrainableModel.trainable_state_dict``, the
same call whichever sharder and LoRA twin built the model), then rank 0 writes PEFT's two files,
``adapter_config.json`` + ``adapter_model.safetensors``, that
``peft.PeftModel.from_pretrained(LlamaForCausalLM(...), dir)`` and ``lora.load_adapter`` both load.
``base_model_name_or_path`` records the base's directory and ``home70b_base.json`` (beside PEFT's two
files, which PEFT ignores) the base's shape (`base_shape`), so loading the adapter onto another base
fails with a message that says so (`load_onto_base`). The three files are written all or nothing: into
a temporary directory, then renamed into place.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import llama
import lora

from .build import BuildOptions, Built
from .files import replace_directory, temporary_sibling
from .twins import adapter_key
from .twins.adapters import PEFT_PREFIX

BASE_FILE = "home70b_base.json"
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")


def base_shape(config: llama.LlamaConfig) -> dict[str, int]:
    """The base model's shape: what an adapter (and a checkpoint) must match to be loaded onto it."""
    return {k: getattr(config, k) for k in SHAPE_FIELDS}


def adapter_config(opts: BuildOptions, targets: list[str], base: str) -> dict:
    """PEFT's ``adapter_config.json`` for a LoRA adapter of ``opts`` on the modules ``targets``."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": opts.rank,
            "lora_alpha": opts.alpha, "lora_dropout": opts.dropout, "use_rslora": False, "use_dora": opts.dora,
            "target_modules": sorted(targets), "init_lora_weights": True, "inference_mode": True, "bias": "none",
            "fan_in_fan_out": False, "modules_to_save": None}


def save_trained_adapter(built: Built, opts: BuildOptions, directory: Path, extra: dict[str, str] | None = None) -> Path | None:
    """Write the trained adapter to ``directory`` on rank 0 (collective: every rank calls it); ``extra``:
    more text files ``{name: text}`` written with it (the chat template it was trained with)."""
    state = built.trainable.trainable_state_dict()
    if dist.get_rank() != 0:
        return None
    directory = Path(directory)
    tensors = {PEFT_PREFIX + adapter_key(name): t.contiguous() for name, t in state.items()}
    base = str(Path(opts.model).resolve())
    config = adapter_config(opts, built.lora_names, base)
    shape = base_shape(llama.LlamaConfig.from_hf(opts.model))
    tmp = temporary_sibling(directory)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / BASE_FILE).write_text(json.dumps(shape, indent=1) + "\n")
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    replace_directory(tmp, directory)
    return directory


def load_onto_base(model_dir, adapter_dir, dtype=torch.float32) -> llama.Llama:
    """The plain (unquantized) base of ``model_dir`` with the adapter of ``adapter_dir`` loaded.

    An adapter trained on a base of another shape is refused with a ValueError naming both shapes."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    shape_file, actual = Path(adapter_dir) / BASE_FILE, base_shape(llama.LlamaConfig.from_hf(model_dir))
    recorded = json.loads(shape_file.read_text()) if shape_file.is_file() else None
    if recorded is not None and recorded != actual:
        differ = {k: (recorded.get(k), v) for k, v in actual.items() if recorded.get(k) != v}
        raise ValueError(f"adapter {adapter_dir} was trained on another base ({config.get('base_model_name_or_path')}):"
                         f" (adapter's, this base's) = {differ}")
    model = llama.load_checkpoint(None, model_dir).to(dtype)
    lora.load_adapter(model, adapter_dir)
    return model
