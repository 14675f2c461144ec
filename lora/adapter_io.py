"""Adapters on disk in PEFT's format, so PEFT loads ours and we load PEFT's.

A directory with two files (what ``PeftModel.save_pretrained`` writes for a LoRA adapter):

* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
  ``use_dora``, ``target_modules`` (the wrapped module names), ``base_model_name_or_path``, ...
* ``adapter_model.safetensors``: ``base_model.model.<module name>.lora_A.weight`` [r, in],
  ``... .lora_B.weight`` [out, r] and, for DoRA, ``... .lora_magnitude_vector`` [out].

Both are written atomically (a temporary file in the same directory, then ``os.replace``): a crash leaves
the old file or the new one, never half of one. Nothing is ever unpickled.
"""
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import inject, lora_layers

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_TENSOR_NAMES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
# PEFT options this module does not implement: loading a file that uses one must fail, not half-work.
_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None, "layers_to_transform": None, "use_qalora": False, "lora_bias": False}


def write_atomically(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path`` (all or nothing)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _shared_hyperparameters(layers) -> dict:
    settings = {(l.r, l.alpha, l.rslora, l.dora, getattr(l.lora_dropout, "p", 0.0)) for _, l in layers}
    if len(settings) != 1:
        raise ValueError(f"save_adapter needs one (r, alpha, rslora, dora, dropout) for all layers; found {sorted(settings)}")
    r, alpha, rslora, dora, dropout = settings.pop()
    return {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": dora, "lora_dropout": dropout}


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model`` to ``directory`` in PEFT's format; return the directory."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("save_adapter: model has no LoRA layers (call lora.inject first)")
    if any(layer.merged for _, layer in layers):
        raise ValueError("save_adapter: adapters are merged into the base; call lora.unmerge(model) first")
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
              **_shared_hyperparameters(layers), "target_modules": sorted(name for name, _ in layers),
              "init_lora_weights": True, "inference_mode": True, **_UNSUPPORTED}
    tensors = {}
    for name, layer in layers:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory}")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {path} has peft_type={config.get('peft_type')!r}, expected 'LORA'")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise ValueError(f"load_adapter: {path} sets {key}={config[key]!r}, which lora does not support")
    return config


def _read_tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A.weight": t, "lora_B.weight": t, maybe "lora_magnitude_vector": t}}."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory} (pickled .bin files are not read)")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        suffix = next((s for s in _TENSOR_NAMES if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"load_adapter: unexpected tensor {key!r} in {path}")
        grouped.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[suffix] = tensor
    return grouped


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load an adapter written by `save_adapter` or by PEFT into ``model``; return the module names.

    A model without LoRA layers is first injected with the file's targets and hyperparameters; a model
    that has them must wrap exactly the file's targets with the same r, alpha, rsLoRA and DoRA.
    Every mismatch (target, rank, shape, missing tensor) is a ValueError that names it.
    """
    directory = Path(directory)
    config, tensors = _read_config(directory), _read_tensors(directory)
    r, alpha = config["r"], config["lora_alpha"]
    rslora, dora = config.get("use_rslora", False), config.get("use_dora", False)
    names = sorted(tensors)
    if not any(True for _ in lora_layers(model)):
        inject(model, target_modules=names, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
               rslora=rslora, dora=dora, exclude=())
    layers = dict(lora_layers(model))
    if sorted(layers) != names:
        raise ValueError(f"load_adapter: the file targets {sorted(set(names) - set(layers))} that the model does "
                         f"not wrap, and the model wraps {sorted(set(layers) - set(names))} that the file lacks")
    for name in names:
        layer, found = layers[name], tensors[name]
        if (layer.r, layer.alpha, layer.rslora, layer.dora) != (r, alpha, rslora, dora):
            raise ValueError(f"load_adapter: {name} has (r, alpha, rslora, dora) = {(layer.r, layer.alpha, layer.rslora, layer.dora)}, "
                             f"the file has {(r, alpha, rslora, dora)}")
        expected = {"lora_A.weight": layer.lora_A.weight, "lora_B.weight": layer.lora_B.weight}
        if dora:
            expected["lora_magnitude_vector"] = layer.lora_magnitude_vector
        if sorted(found) != sorted(expected):
            raise ValueError(f"load_adapter: {name} has tensors {sorted(found)} in the file, expected {sorted(expected)}")
        for key, param in expected.items():
            if found[key].shape != param.shape:
                raise ValueError(f"load_adapter: {PREFIX}{name}.{key} has shape {tuple(found[key].shape)}, the model "
                                 f"expects {tuple(param.shape)} (rank {layer.r}, in {layer.in_features}, out {layer.out_features})")
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(found[key])
    return names
