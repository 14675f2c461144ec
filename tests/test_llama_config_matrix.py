"""llama.LlamaConfig against published configs, in both transformers generations, and against transformers' logits.

Each published ``config.json`` below is shrunk to a tiny width (hidden 16 per head, 2 layers, heads
scaled keeping the grouped-query ratio, ``head_dim`` 16 where it is stored); every other field is kept,
vocabulary included -- except that the llama3 scaling's ``original_max_position_embeddings`` and
``max_position_embeddings`` are divided by 128 (8192 -> 64), so a 72-token sequence already runs past
the original context and every band of the scaling is in play.
"""
import json

import pytest
import torch
from reference_libs import reference

import llama
from llama.model import rope_frequencies

_LLAMA2 = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
           "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
           "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
           "vocab_size": 32000}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
           "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
           "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
           "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256}
_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}
PUBLISHED = {
    "Llama-2-7B": _LLAMA2,
    "CodeLlama-7B": {**_LLAMA2, "max_position_embeddings": 16384, "rope_theta": 1000000, "torch_dtype": "bfloat16",
                     "vocab_size": 32016},
    "Llama-3-8B": _LLAMA3,
    "Llama-3.1-8B": {**_LLAMA3, "max_position_embeddings": 131072, "mlp_bias": False, "rope_scaling": _LLAMA31_SCALING},
    "Llama-3.2-1B": {**_LLAMA3, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
                     "max_position_embeddings": 131072, "mlp_bias": False, "num_hidden_layers": 16,
                     "rope_scaling": {**_LLAMA31_SCALING, "factor": 32.0}, "tie_word_embeddings": True},
    "TinyLlama-1.1B": {**_LLAMA2, "attention_bias": False, "hidden_size": 2048, "intermediate_size": 5632,
                       "max_position_embeddings": 2048, "num_hidden_layers": 22, "num_key_value_heads": 4,
                       "rope_theta": 10000.0, "torch_dtype": "bfloat16"},
}
SEQ = 72


def shrink(published: dict) -> dict:
    ratio = published["num_attention_heads"] // published["num_key_value_heads"]
    heads = max(4, 2 * ratio)
    raw = {**published, "num_attention_heads": heads, "num_key_value_heads": heads // ratio,
           "hidden_size": 16 * heads, "intermediate_size": 40 * heads, "num_hidden_layers": 2}
    if "head_dim" in raw:
        raw["head_dim"] = 16
    if raw["rope_scaling"]:
        raw["rope_scaling"] = {**raw["rope_scaling"],
                               "original_max_position_embeddings": raw["rope_scaling"]["original_max_position_embeddings"] // 128}
        raw["max_position_embeddings"] //= 128
    return raw


@pytest.fixture(params=sorted(PUBLISHED))
def case(request, tmp_path):
    """(name, transformers-4-style directory, transformers-5-saved directory)."""
    transformers = reference("transformers")
    raw = shrink(PUBLISHED[request.param])
    old, new = tmp_path / "transformers4", tmp_path / "transformers5"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(raw))
    transformers.AutoConfig.from_pretrained(old).save_pretrained(new)
    return request.param, old, new


def test_both_generations_read_to_the_published_values(case):
    name, old, new = case
    saved = json.loads((new / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved  # transformers 5's own layout
    ours_old, ours_new = llama.LlamaConfig.from_hf(old), llama.LlamaConfig.from_hf(new)
    assert ours_old == ours_new
    published = PUBLISHED[name]
    assert ours_new.rope_theta == published.get("rope_theta", 10000.0)
    assert ours_new.tie_word_embeddings == published["tie_word_embeddings"]
    assert ours_new.vocab_size == published["vocab_size"] and ours_new.eos_token_id == published["eos_token_id"]
    scaling = published["rope_scaling"]
    assert (ours_new.rope_scaling is None) == (scaling is None)
    if scaling:
        assert ours_new.rope_scaling["factor"] == scaling["factor"]


def test_logits_equal_transformers_past_the_original_context(case):
    transformers = reference("transformers")
    name, old, new = case
    config = llama.LlamaConfig.from_hf(new)
    if config.rope_scaling:  # the sequence reaches all three bands of the llama3 rescaling
        original = config.rope_scaling["original_max_position_embeddings"]
        wavelengths = 2 * torch.pi / rope_frequencies(llama.LlamaConfig.from_hf({**json.loads((old / "config.json").read_text()), "rope_scaling": None}))
        assert SEQ > original and (wavelengths > original).any() and (wavelengths < original / 4).any()
        assert ((wavelengths >= original / 4) & (wavelengths <= original)).any()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(new)).eval()
    ours = llama.Llama(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=not config.tie_word_embeddings)
    ids = torch.randint(0, config.vocab_size, (1, SEQ))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_written_config_reads_back_the_same_in_transformers_and_here(case, tmp_path):
    transformers = reference("transformers")
    _, _, new = case
    config = llama.LlamaConfig.from_hf(new)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    assert llama.LlamaConfig.from_hf(tmp_path) == config
    theirs, reference_config = (transformers.AutoConfig.from_pretrained(d) for d in (tmp_path, new))
    assert theirs.rope_parameters == reference_config.rope_parameters
    for field in ("hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings", "vocab_size"):
        assert getattr(theirs, field) == getattr(reference_config, field)


BASE = shrink(PUBLISHED["Llama-3.1-8B"])


@pytest.mark.parametrize("change, field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "mistral"}, "model_type"),
    ({"head_dim": 32}, "head_dim"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling: rope type 'linear'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters: rope type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing"),
    ({"rope_scaling": {**_LLAMA31_SCALING, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"pretraining_tp": 0}, "pretraining_tp"),
])
def test_unsupported_fields_are_refused_by_name(change, field):
    with pytest.raises(ValueError, match=field):
        llama.LlamaConfig.from_hf({**BASE, **change})


def test_type_spelling_and_pretraining_tp_are_accepted():
    spelled = {**BASE, "rope_scaling": {**{k: v for k, v in BASE["rope_scaling"].items() if k != "rope_type"},
                                        "type": "llama3"}, "pretraining_tp": 2}
    assert llama.LlamaConfig.from_hf(spelled) == llama.LlamaConfig.from_hf(BASE)
