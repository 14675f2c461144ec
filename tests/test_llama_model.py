"""llama.config + llama.model: presets, HF config parsing, meta construction, parity with transformers."""
import json

import pytest
import torch
from reference_libs import reference

import llama
from llama.model import rope_frequencies

LLAMA2_STYLE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=100)
LLAMA31_STYLE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=100, rope_theta=500000.0, max_position_embeddings=128,
                     tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


def test_llama_2_70b_on_meta_has_the_published_parameter_count():
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig.preset("llama-2-70b"))
    assert sum(p.numel() for p in model.parameters()) == 68_976_648_192
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name, params", [("llama-2-7b", 6_738_415_616), ("llama-3-70b", 70_553_706_496)])
def test_other_presets_match_published_counts(name, params):
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig.preset(name))
    assert sum(p.numel() for p in model.parameters()) == params


def test_state_dict_keys_are_hugging_face_names():
    model = llama.Llama(llama.LlamaConfig(**LLAMA2_STYLE))
    keys = list(model.state_dict())
    assert keys[0] == "model.embed_tokens.weight" and keys[-2:] == ["model.norm.weight", "lm_head.weight"]
    layer0 = [k for k in keys if k.startswith("model.layers.0.")]
    assert layer0 == [f"model.layers.0.{k}.weight" for k in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert isinstance(model.model.layers, torch.nn.ModuleList) and len(model.model.layers) == 2
    assert isinstance(model.get_submodule("model.layers.1.mlp.down_proj"), torch.nn.Linear)


def test_tied_embeddings_share_one_parameter():
    model = llama.Llama(llama.LlamaConfig(**LLAMA31_STYLE))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_from_hf_reads_dict_file_and_directory(tmp_path):
    raw = {**LLAMA31_STYLE, "model_type": "llama", "hidden_act": "silu", "unrelated_field": 1}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for source in (raw, tmp_path, tmp_path / "config.json", str(tmp_path)):
        cfg = llama.LlamaConfig.from_hf(source)
        assert cfg.num_key_value_heads == 2 and cfg.rope_scaling["factor"] == 8.0 and cfg.tie_word_embeddings
    no_kv = {k: v for k, v in LLAMA2_STYLE.items() if k != "num_key_value_heads"}
    assert llama.LlamaConfig.from_hf(no_kv).num_key_value_heads == 4  # Llama 1 / 2-7B omit it: MHA


@pytest.mark.parametrize("bad, message", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_bad_config_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig(**{**LLAMA2_STYLE, **bad})


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config"):
        llama.LlamaConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        llama.LlamaConfig.from_hf({"hidden_size": 8})
    with pytest.raises(ValueError, match="unknown preset"):
        llama.LlamaConfig.preset("llama-9-1b")


def test_llama3_rope_scaling_matches_the_three_bands():
    """Against the definition: long wavelengths / factor, short ones unchanged, the middle smoothed."""
    cfg = llama.LlamaConfig.preset("llama-3.1-70b")
    plain = rope_frequencies(llama.LlamaConfig.preset("llama-3-70b"))
    scaled = rope_frequencies(cfg)
    wavelen = 2 * torch.pi / plain
    long, short = wavelen > 8192, wavelen < 8192 / 4
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    torch.testing.assert_close(scaled[short], plain[short])
    middle = ~long & ~short
    assert middle.any() and ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)).all()


def test_loss_is_the_shifted_next_token_cross_entropy():
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(**LLAMA2_STYLE))
    x = torch.randint(0, 100, (2, 9))
    labels = x.clone()
    labels[0, 4] = -100
    logits, loss = model(x, labels=labels)
    log_probs = logits.log_softmax(-1)
    terms = [-log_probs[b, t, labels[b, t + 1]] for b in range(2) for t in range(8) if labels[b, t + 1] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :-1])


def test_causal_nothing_depends_on_the_future():
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(**LLAMA31_STYLE))
    x = torch.randint(0, 100, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 100
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])


@pytest.mark.parametrize("style", [LLAMA2_STYLE, LLAMA31_STYLE], ids=["llama2", "llama3.1-gqa-rope-scaling"])
def test_logits_match_transformers(style):
    transformers = reference("transformers")
    cfg = llama.LlamaConfig(**style)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    ours = llama.Llama(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 40))  # 40 > original context 16: the scaled band is used
    with torch.no_grad():
        expected = hf(x, labels=x)
        logits, loss = ours(x, labels=x)
    assert (logits - expected.logits).abs().max().item() < 1e-4
    torch.testing.assert_close(loss, expected.loss)
