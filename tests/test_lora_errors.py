"""Bad input to every public lora function: a TypeError/ValueError naming the argument (or the file and
key) and what is expected -- never a crash deep inside, never a silent NaN, never a half-changed model."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora
from test_lora_adapter_io import adapted_tiny_model
from test_lora_inject import TinyModel


@pytest.mark.parametrize("kwargs, error, match", [
    ({"alpha": math.inf}, ValueError, "alpha must be a finite number > 0; got inf"),
    ({"alpha": math.nan}, ValueError, "alpha must be a finite number > 0; got nan"),
    ({"alpha": 0}, ValueError, "alpha must be a finite number > 0; got 0"),
    ({"alpha": -2.0}, ValueError, "alpha must be"),
    ({"alpha": "8"}, TypeError, "alpha must be a number; got '8'"),
    ({"alpha": True}, TypeError, "alpha must be a number"),
    ({"r": 0}, ValueError, "r must be an int >= 1; got 0"),
    ({"r": 2.0}, ValueError, "r must be an int >= 1; got 2.0"),
    ({"r": True}, ValueError, "r must be an int"),
    ({"r": 17}, ValueError, r"r must be <= min\(in_features, out_features\) = 16; got 17"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\); got 1.0"),
    ({"dropout": -0.1}, ValueError, "dropout must be in"),
    ({"dropout": math.nan}, ValueError, "dropout must be in"),
    ({"dropout": None}, TypeError, "dropout must be a number; got None"),
    ({"rslora": "yes"}, TypeError, "rslora must be a bool; got 'yes'"),
    ({"dora": 1}, TypeError, "dora must be a bool"),
    ({"dtype": torch.int8}, TypeError, "dtype must be a floating-point torch.dtype; got torch.int8"),
    ({"dtype": "bf16"}, TypeError, "dtype must be a floating-point"),
])
def test_layer_hyperparameters_outside_their_domain(kwargs, error, match):
    with pytest.raises(error, match=match):
        lora.LoRALinear(nn.Linear(16, 32), **kwargs)


def test_layer_base_and_input_errors():
    with pytest.raises(TypeError, match="base must be linear-like"):
        lora.LoRALinear(nn.ReLU())
    base = nn.Linear(4, 3)
    with torch.no_grad():
        base.weight[1] = 0
    with pytest.raises(ValueError, match=r"dora=True needs a finite, non-zero norm .* rows \[1\]"):
        lora.LoRALinear(base, r=2, dora=True)
    layer = lora.LoRALinear(nn.Linear(4, 3), r=2)
    with pytest.raises(TypeError, match="input x must be a floating-point tensor; got torch.int64"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="got list"):
        layer([1.0, 2.0])
    with pytest.raises(ValueError, match=r"input x has shape \(2, 5\), expected \[..., in_features = 4\]"):
        layer(torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"input x has shape \(\)"):
        layer(torch.tensor(1.0))


def test_inject_checks_everything_before_changing_the_model():
    model = TinyModel()
    for kwargs, match in [({"alpha": math.inf}, "alpha must be a finite"), ({"r": 17}, "r=17 exceeds"),
                          ({"target_modules": "q_proj("}, "not a valid regular expression"),
                          ({"dtype": torch.int32}, "dtype must be")]:
        with pytest.raises((TypeError, ValueError), match=match):
            lora.inject(model, **kwargs)
        assert not list(lora.lora_layers(model)) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="exclude must be a list/tuple of names; got 'lm_head'"):
        lora.inject(model, exclude="lm_head")
    with pytest.raises(TypeError, match="exclude must be"):
        lora.inject(model, exclude=[3])


@pytest.mark.parametrize("call", [lora.inject, lora.lora_layers, lora.merge, lora.unmerge, lora.trainable_parameters,
                                  lora.count_parameters, lambda m: lora.save_adapter(m, "x"),
                                  lambda m: lora.load_adapter(m, "x"), lambda m: lora.select_targets(m, "all-linear")])
def test_a_model_that_is_not_a_module(call):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got dict"):
        call({"q_proj": nn.Linear(2, 2)})


def test_other_argument_types():
    with pytest.raises(TypeError, match="base_model_name_or_path must be a str or None; got 3"):
        lora.save_adapter(adapted_tiny_model(), "x", base_model_name_or_path=3)
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike; got int"):
        lora.load_adapter(TinyModel(), 3)
    with pytest.raises(TypeError, match="base must be a linear-like module"):
        lora.dequantized_weight(nn.ReLU())
    with pytest.raises(TypeError, match="dtype must be None or a floating-point torch.dtype; got torch.uint8"):
        lora.dequantized_weight(nn.Linear(2, 2), torch.uint8)
    with pytest.raises(TypeError, match="fn must be callable"):
        lora.record_saved_tensors(3)
    with pytest.raises(TypeError, match="module must be an nn.Module or None"):
        lora.record_saved_tensors(lambda: None, module="m")
    with pytest.raises(TypeError, match="frozen_linear: base must be a linear-like module; got ReLU"):
        lora.frozen_linear(nn.ReLU(), torch.ones(2))
    with pytest.raises(TypeError, match="frozen_linear: x must be a floating-point tensor; got torch.int64"):
        lora.frozen_linear(nn.Linear(2, 2), torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="is_quantized: base must be linear-like"):
        lora.is_quantized(nn.ReLU())
    with pytest.raises(TypeError, match="records must be the SavedTensor list"):
        lora.activation_bytes([3])
    assert "trainable%: 0.0000" in str(lora.count_parameters(nn.Sequential()))  # no ZeroDivisionError


@pytest.fixture
def saved(tmp_path):
    lora.save_adapter(adapted_tiny_model(dora=True), tmp_path)
    return tmp_path, json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("text, match", [
    ("{not json", r"adapter_config.json is not valid JSON"),
    ("[1, 2]", r"adapter_config.json holds a JSON list, expected an object"),
    ('"LORA"', r"holds a JSON str"),
    (b"\xff\xfe", r"is not valid JSON"),
])
def test_a_config_that_is_not_a_json_object(saved, text, match):
    directory, _ = saved
    path = directory / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match):
        lora.load_adapter(TinyModel(), directory)


@pytest.mark.parametrize("change, match", [
    ({"r": None}, r"lacks the key 'r'"),
    ({"lora_alpha": None}, r"lacks the key 'lora_alpha'"),
    ({"r": "2"}, r"adapter_config.json: r must be an int >= 1; got '2'"),
    ({"r": 0}, r"r must be an int >= 1; got 0"),
    ({"lora_alpha": math.inf}, r"alpha must be a finite number > 0; got inf"),
    ({"lora_alpha": [4]}, r"alpha must be a number"),
    ({"lora_dropout": 1.5}, r"dropout must be in \[0, 1\); got 1.5"),
    ({"use_dora": "true"}, r"dora must be a bool; got 'true'"),
    ({"use_dora": False}, r"has tensors \['lora_A.weight', 'lora_B.weight', 'lora_magnitude_vector'\] .* "
                          r"expected \['lora_A.weight', 'lora_B.weight'\]"),
])
def test_config_fields_outside_their_domain(saved, change, match):
    directory, config = saved
    config = {k: v for k, v in (config | change).items() if v is not None}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    model = TinyModel()
    with pytest.raises(ValueError, match=match):
        lora.load_adapter(model, directory)
    assert not list(lora.lora_layers(model))  # refused before anything was injected


def test_a_truncated_or_corrupt_weights_file_names_its_path(saved):
    directory, _ = saved
    path = directory / "adapter_model.safetensors"
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"\x00" * 3, b"garbage" * 20):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file"):
            lora.load_adapter(TinyModel(), directory)


KEY = "base_model.model.layers.0.attn.q_proj."


@pytest.mark.parametrize("key, tensor, match", [
    ("lora_A.weight", torch.ones(2, 16, dtype=torch.int32), r"lora_A.weight has dtype torch.int32, expected a floating"),
    ("lora_B.weight", torch.full((16, 2), math.nan), r"lora_B.weight holds non-finite values"),
    ("lora_magnitude_vector", torch.full((16,), math.inf), r"lora_magnitude_vector holds non-finite"),
    ("lora_magnitude_vector", torch.ones(15), r"lora_magnitude_vector has shape \(15,\), the model expects \(16,\)"),
    ("lora_magnitude_vector", torch.ones(16, 1), r"lora_magnitude_vector has shape \(16, 1\)"),
    ("lora_B.weight", torch.ones(16, 3), r"lora_B.weight has shape \(16, 3\), the model expects \(16, 2\) \(rank 2"),
    ("lora_C.weight", torch.ones(2), r"unexpected tensor 'base_model.model.layers.0.attn.q_proj.lora_C.weight'"),
    (None, None, r"holds no tensors"),
])
def test_bad_tensors_are_named_and_the_model_is_left_unchanged(saved, key, tensor, match):
    directory, _ = saved
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors = {} if key is None else tensors | {KEY + key: tensor}
    save_file(tensors, path)
    model = TinyModel()
    with pytest.raises(ValueError, match=match):
        lora.load_adapter(model, directory)
    assert not list(lora.lora_layers(model))


def test_a_target_that_is_not_a_linear_layer(saved):
    directory, _ = saved
    tensors = {k.replace("layers.0.attn.q_proj", "layers.0.norm"): v for k, v in load_file(directory / "adapter_model.safetensors").items()}
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"target 'layers.0.norm' is a LayerNorm, not a linear layer"):
        lora.load_adapter(TinyModel(), directory)
