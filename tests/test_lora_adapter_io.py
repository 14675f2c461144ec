"""Adapter files: PEFT's format both ways (HF LlamaForCausalLM, tiny random config), atomic writes, named errors."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import lora
from reference_libs import reference
from test_lora_inject import TinyModel, VOCAB


def tiny_llama():
    transformers = reference("transformers")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def train_a_few_steps(model, ids, steps=3):
    optimizer = torch.optim.SGD(lora.trainable_parameters(model), lr=0.5)
    for _ in range(steps):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.slow
@pytest.mark.parametrize("dora, rslora", [(False, False), (True, True)])
def test_an_adapter_trained_here_loads_in_peft_with_the_same_logits(tmp_path, dora, rslora):
    peft = reference("peft")
    base = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 7))
    base_logits = base(ids).logits
    ours = copy.deepcopy(base)
    wrapped = lora.inject(ours, "all-linear", r=4, alpha=8, dora=dora, rslora=rslora)
    assert len(wrapped) == 14  # 7 projections x 2 layers, lm_head excluded
    train_a_few_steps(ours.train(), ids)
    ours.eval()
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora.lora_layers(ours))
    lora.save_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama")

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        ours_logits, their_logits = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(their_logits, ours_logits, rtol=1e-5, atol=1e-5)
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True])
def test_an_adapter_made_by_peft_loads_here_with_the_same_logits(tmp_path, dora):
    peft = reference("peft")
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora,
                             init_lora_weights=False)  # random B: a non-trivial adapter
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    loaded = lora.load_adapter(ours, tmp_path)
    assert loaded == sorted(f"model.layers.{i}.{m}" for i in range(2)
                            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-2


def adapted_tiny_model(r=2, dora=False):
    torch.manual_seed(0)
    model = TinyModel()
    lora.inject(model, ["q_proj", "down_proj"], r=r, alpha=4, dora=dora)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    return model


@pytest.mark.parametrize("dora", [False, True])
def test_round_trip_and_file_layout(tmp_path, dora):
    model = adapted_tiny_model(dora=dora)
    lora.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 2, 4, dora)
    assert config["target_modules"] == ["layers.0.attn.q_proj", "layers.0.mlp.down_proj",
                                        "layers.1.attn.q_proj", "layers.1.mlp.down_proj"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (2, 24)
    assert tensors["base_model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (16, 2)
    assert ("base_model.model.layers.1.attn.q_proj.lora_magnitude_vector" in tensors) == dora
    assert len(tensors) == 4 * (3 if dora else 2)

    torch.manual_seed(0)
    fresh = TinyModel()  # the same base weights as adapted_tiny_model's, no adapters
    lora.load_adapter(fresh, tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(fresh(ids), model(ids))


def test_mismatches_are_named(tmp_path):
    lora.save_adapter(adapted_tiny_model(r=2), tmp_path)
    with pytest.raises(ValueError, match=r"\(r, alpha, rslora, dora\) = \(3"):
        lora.load_adapter(adapted_tiny_model(r=3), tmp_path)  # injected already with another rank
    other = TinyModel()
    lora.inject(other, ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="down_proj"):  # the file targets modules the model does not wrap
        lora.load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match="which the model does not have"):  # a target the model lacks
        lora.load_adapter(torch.nn.Sequential(torch.nn.Linear(16, 16)), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.layers.0.attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(2, 5)
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"{key} has shape \(2, 5\), the model expects \(2, 16\)"):
        lora.load_adapter(TinyModel(), tmp_path)


def test_bad_files_and_bad_models_are_named(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.save_adapter(TinyModel(), tmp_path)
    model = adapted_tiny_model()
    lora.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora.save_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(TinyModel(), tmp_path)
    lora.unmerge(model)
    lora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"bias": "all"}))
    with pytest.raises(ValueError, match="bias='all'"):
        lora.load_adapter(TinyModel(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        lora.load_adapter(TinyModel(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lora.load_adapter(TinyModel(), tmp_path)
