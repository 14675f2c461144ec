"""Adapters on disk in PEFT's format, so PEFT loads ours and we load PEFT's.

A directory with two files (what ``PeftModel.save_pretrained`` writes for a LoRA adapter):

* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
  ``use_dora``, ``target_modules`` (the wrapped module names), ``base_model_name_or_path``, ...
* ``adapter_model.safetensors``: ``base_model.model.<module name>.lora_A.weight`` [r, in],
  ``... .lora_B.weight`` [out, r] and, for DoRA, ``... .lora_magnitude_vector`` [out].

The two belong together, so they are written as one set with `write_files_atomically`: a failure or a
kill leaves the previous adapter or the new one, never new weights beside an old config. Everything read
is checked before the model is touched (the JSON field by field, each tensor's dtype, shape and values);
a bad file is a ValueError naming the file and the key. Nothing is ever unpickled.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .atomic_files import committed_directory, write_atomically, write_files_atomically  # noqa: F401 (re-export)
from .inject import check_model, inject, lora_layers
from .layer import check_hyperparameters

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_TENSOR_NAMES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
# PEFT options this module does not implement: loading a file that uses one must fail, not half-work.
_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None, "layers_to_transform": None, "use_qalora": False, "lora_bias": False}


def _shared_hyperparameters(layers) -> dict:
    settings = {(l.r, l.alpha, l.rslora, l.dora, getattr(l.lora_dropout, "p", 0.0)) for _, l in layers}
    if len(settings) != 1:
        raise ValueError(f"save_adapter needs one (r, alpha, rslora, dora, dropout) for all layers; found {sorted(settings)}")
    r, alpha, rslora, dora, dropout = settings.pop()
    return {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": dora, "lora_dropout": dropout}


def _check_tensor(key: str, tensor: torch.Tensor, where: str) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{where}: tensor {key} has dtype {tensor.dtype}, expected a floating-point dtype")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where}: tensor {key} holds non-finite values (NaN or inf)")


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model`` to ``directory`` in PEFT's format, both files or neither; return it.

    Refused before anything is written: a model without LoRA layers, merged adapters, layers with
    different hyperparameters, and a non-finite adapter tensor (a diverged run must not replace a good file).
    """
    check_model(model, "save_adapter")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"save_adapter: base_model_name_or_path must be a str or None; got {base_model_name_or_path!r}")
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
    for key, tensor in tensors.items():
        _check_tensor(key, tensor, "save_adapter")
    return write_files_atomically(directory, {
        WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
    })


def _config_error(path: Path, key: str, value, expected: str) -> ValueError:
    return ValueError(f"load_adapter: {path} has {key}={value!r}; expected {expected}")


def _read_config(directory: Path) -> dict:
    """The config's fields, each checked: {"r", "alpha", "dropout", "rslora", "dora"}."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory}")
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_adapter: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {path} holds a JSON {type(config).__name__}, expected an object {{...}}")
    if config.get("peft_type") != "LORA":
        raise _config_error(path, "peft_type", config.get("peft_type"), "'LORA'")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"load_adapter: {path} lacks the key {key!r}")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise ValueError(f"load_adapter: {path} sets {key}={config[key]!r}, which lora does not support")
    fields = {"r": config["r"], "alpha": config["lora_alpha"], "dropout": config.get("lora_dropout", 0.0),
              "rslora": config.get("use_rslora", False), "dora": config.get("use_dora", False)}
    try:
        check_hyperparameters(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_adapter: {path}: {err}") from None
    return fields


def _read_tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A.weight": t, "lora_B.weight": t, maybe "lora_magnitude_vector": t}}."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory} (pickled .bin files are not read)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"load_adapter: {path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if not tensors:
        raise ValueError(f"load_adapter: {path} holds no tensors")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _TENSOR_NAMES if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"load_adapter: unexpected tensor {key!r} in {path}")
        _check_tensor(key, tensor, f"load_adapter: {path}")
        grouped.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[suffix] = tensor
    return grouped


def _expected_shapes(model: nn.Module, name: str, r: int, dora: bool) -> dict[str, tuple[int, ...]]:
    """The tensor shapes module ``name`` of ``model`` (wrapped or not yet) needs for rank ``r``."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"load_adapter: the file has tensors for {name!r}, which the model does not have") from None
    if not all(hasattr(module, a) for a in ("in_features", "out_features")):
        raise ValueError(f"load_adapter: the file's target {name!r} is a {type(module).__name__}, not a linear layer")
    shapes = {"lora_A.weight": (r, module.in_features), "lora_B.weight": (module.out_features, r)}
    if dora:
        shapes["lora_magnitude_vector"] = (module.out_features,)
    return shapes


def _check_against_model(model, tensors, fields, path: Path) -> None:
    """Every module the file names exists, has the file's tensor set, and each tensor the shape it needs."""
    for name, found in tensors.items():
        expected = _expected_shapes(model, name, fields["r"], fields["dora"])
        if sorted(found) != sorted(expected):
            raise ValueError(f"load_adapter: {name} has tensors {sorted(found)} in {path}, expected {sorted(expected)}"
                             f" (use_dora={fields['dora']})")
        for key, shape in expected.items():
            if tuple(found[key].shape) != shape:
                raise ValueError(f"load_adapter: {PREFIX}{name}.{key} has shape {tuple(found[key].shape)}, the model "
                                 f"expects {shape} (rank {fields['r']}, in {expected['lora_A.weight'][1]}, "
                                 f"out {expected['lora_B.weight'][0]})")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load an adapter written by `save_adapter` or by PEFT into ``model``; return the module names.

    A model without LoRA layers is first injected with the file's targets and hyperparameters; a model
    that has them must wrap exactly the file's targets with the same r, alpha, rsLoRA and DoRA. The
    directory is read through `committed_directory` (the last complete set, even after a killed write).
    Everything is checked before the model changes; every problem is a ValueError that names it.
    """
    check_model(model, "load_adapter")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"load_adapter: directory must be a str or os.PathLike; got {type(directory).__name__}")
    directory = committed_directory(directory)
    fields, tensors = _read_config(directory), _read_tensors(directory)
    names = sorted(tensors)
    layers = dict(lora_layers(model))
    if layers and sorted(layers) != names:
        raise ValueError(f"load_adapter: the file targets {sorted(set(names) - set(layers))} that the model does "
                         f"not wrap, and the model wraps {sorted(set(layers) - set(names))} that the file lacks")
    wanted = (fields["r"], fields["alpha"], fields["rslora"], fields["dora"])
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.rslora, layer.dora) != wanted:
            raise ValueError(f"load_adapter: {name} has (r, alpha, rslora, dora) = {(layer.r, layer.alpha, layer.rslora, layer.dora)}, "
                             f"the file has {wanted}")
    _check_against_model(model, tensors, fields, directory / WEIGHTS_NAME)
    if not layers:
        inject(model, target_modules=names, r=fields["r"], alpha=fields["alpha"], dropout=fields["dropout"],
               rslora=fields["rslora"], dora=fields["dora"], exclude=())
        layers = dict(lora_layers(model))
    with torch.no_grad():
        for name in names:
            layer = layers[name]
            for key, tensor in tensors[name].items():
                param = layer.lora_magnitude_vector if key == "lora_magnitude_vector" else \
                    getattr(layer, key.split(".")[0]).weight
                param.copy_(tensor)
    return names
