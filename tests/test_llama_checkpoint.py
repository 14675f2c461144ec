"""llama.checkpoint: save/load round trips, layer-by-layer streaming, bnb 4-bit pass-through, clear errors."""
import json
import os

import pytest
import torch
from reference_libs import reference
from safetensors.torch import load_file, save_file

import llama
from llama.checkpoint import INDEX_FILE, SINGLE_FILE
from llama.hf_writer import StreamingWriter

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)


def tiny(**overrides) -> llama.Llama:
    torch.manual_seed(0)
    return llama.Llama(llama.LlamaConfig(**{**TINY, **overrides}))


def assert_same_weights(a: llama.Llama, b: llama.Llama):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("max_shard_bytes", [2**30, 40_000], ids=["single-file", "sharded"])
def test_save_then_load_round_trips(tmp_path, max_shard_bytes):
    model = tiny()
    files = llama.save_checkpoint(model, tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = max_shard_bytes < 2**30
    assert (tmp_path / INDEX_FILE).is_file() == sharded and (tmp_path / SINGLE_FILE).is_file() != sharded
    assert len(files) > 1 if sharded else files == [tmp_path / SINGLE_FILE]
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
    loaded = llama.load_checkpoint(None, tmp_path)  # built on meta from config.json, then materialised
    assert loaded.config == model.config and not any(p.is_meta for p in loaded.parameters())
    assert_same_weights(model, loaded)
    torch.manual_seed(1)
    existing = llama.Llama(model.config)  # materialised, different weights: copied into
    assert not torch.equal(existing.lm_head.weight, model.lm_head.weight)
    assert llama.load_checkpoint(existing, tmp_path) is existing
    assert_same_weights(model, existing)


def test_resaving_single_after_sharded_removes_the_stale_index(tmp_path):
    model = tiny()
    llama.save_checkpoint(model, tmp_path, max_shard_bytes=40_000)
    llama.save_checkpoint(model, tmp_path)
    assert not (tmp_path / INDEX_FILE).exists()
    assert_same_weights(model, llama.load_checkpoint(None, tmp_path))


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    model = tiny(tie_word_embeddings=True)
    llama.save_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    loaded = llama.load_checkpoint(None, tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_streaming_yields_one_decoder_layer_at_a_time(tmp_path):
    model = tiny()
    llama.save_checkpoint(model, tmp_path, max_shard_bytes=40_000)
    groups = list(llama.iter_checkpoint(tmp_path))
    assert [layer for layer, _ in groups] == [None, 0, 1, 2]
    assert set(groups[0][1]) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer, tensors in groups[1:]:
        assert len(tensors) == 9 and all(k.startswith(f"model.layers.{layer}.") for k in tensors)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for _, tensors in groups for k, t in tensors.items())


def test_on_tensor_sees_every_entry_and_may_consume_it(tmp_path):
    model = tiny()
    llama.save_checkpoint(model, tmp_path)
    seen = []

    def keep_attention_only(name, tensor):
        seen.append(name)
        return None if ".mlp." in name else tensor * 2

    loaded = llama.load_checkpoint(None, tmp_path, on_tensor=keep_attention_only)
    assert sorted(seen) == sorted(model.state_dict())
    assert loaded.model.layers[0].mlp.up_proj.weight.is_meta  # consumed by the hook: left for the caller
    torch.testing.assert_close(loaded.model.layers[1].self_attn.q_proj.weight,
                               2 * model.model.layers[1].self_attn.q_proj.weight)


def bnb_quantized_checkpoint(directory, model):
    """Quantize every decoder-layer linear with bitsandbytes' Linear4bit (NF4, double quantization) and save
    the resulting state dict with safetensors -- the layout of a pre-quantized HF 4-bit checkpoint."""
    bnb = reference("bitsandbytes")
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                  compress_statistics=True, quant_type="nf4")
            q.load_state_dict(module.state_dict())
            q = q.to("cpu")  # quantizes the weight
            del state[f"{name}.weight"]
            state.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
    save_file(state, directory / SINGLE_FILE)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf()))
    return state


def test_bnb_4bit_checkpoint_passes_through_untouched_grouped_per_weight(tmp_path):
    bnb = reference("bitsandbytes")
    model = tiny()
    stored = bnb_quantized_checkpoint(tmp_path, model)
    groups = dict(llama.iter_checkpoint(tmp_path))
    name = "model.layers.1.self_attn.k_proj.weight"
    entry = groups[1][name]
    assert sorted(entry) == ["weight", "weight.absmax", "weight.nested_absmax", "weight.nested_quant_map",
                             "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"]
    assert all(torch.equal(entry[k], stored[name + k[len("weight"):]]) for k in entry)  # untouched bytes
    assert isinstance(groups[1]["model.layers.1.input_layernorm.weight"], torch.Tensor)
    # the group is a valid bitsandbytes state dict with prefix "weight": bnb itself can dequantize it
    stats = {k[len("weight."):]: v for k, v in entry.items() if k != "weight"}
    quant_state = bnb.functional.QuantState.from_dict(stats, device=torch.device("cpu"))
    restored = bnb.functional.dequantize_4bit(entry["weight"], quant_state)
    original = model.get_parameter(name)
    assert restored.shape == original.shape
    assert (restored - original).abs().max() < 0.2 * original.abs().max()
    with pytest.raises(ValueError, match="pre-quantized 4-bit"):
        llama.load_checkpoint(None, tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config"):
        llama.load_checkpoint(None, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny().config.to_hf()))
    with pytest.raises(FileNotFoundError, match="neither"):
        llama.load_checkpoint(None, tmp_path)
    llama.save_checkpoint(tiny(), tmp_path, max_shard_bytes=40_000)
    shard = tmp_path / json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]["model.norm.weight"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        list(llama.iter_checkpoint(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_named(tmp_path, damage):
    llama.save_checkpoint(tiny(), tmp_path)
    path = tmp_path / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + b"not json" * 4)
    with pytest.raises(ValueError, match=SINGLE_FILE):
        llama.load_checkpoint(None, tmp_path)


def test_shape_disagreeing_with_config_is_named(tmp_path):
    llama.save_checkpoint(tiny(intermediate_size=128), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.gate_proj\.weight.*shape"):
        llama.load_checkpoint(None, tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = {k: v.contiguous() for k, v in tiny().state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(tiny().config.to_hf()))
    save_file({k: v for k, v in state.items() if k != "model.layers.2.mlp.up_proj.weight"}, tmp_path / SINGLE_FILE)
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        llama.load_checkpoint(None, tmp_path)
    save_file({**state, "model.layers.3.mlp.up_proj.weight": torch.zeros(1)}, tmp_path / SINGLE_FILE)
    with pytest.raises(KeyError, match=r"unexpected key 'model\.layers\.3\.mlp\.up_proj\.weight' in .*model\.safetensors"):
        llama.load_checkpoint(None, tmp_path)


def test_index_listing_a_key_its_shard_lacks_is_named(tmp_path):
    llama.save_checkpoint(tiny(), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    first, last = sorted(set(index["weight_map"].values()))[0], sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"]["model.norm.weight"] = first if index["weight_map"]["model.norm.weight"] != first else last
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):
        llama.load_checkpoint(None, tmp_path)


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        llama.save_checkpoint(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        llama.save_checkpoint(tiny(), tmp_path, max_shard_bytes=0)
    with torch.device("meta"):
        on_meta = llama.Llama(tiny().config)
    with pytest.raises(ValueError, match="meta"):
        llama.save_checkpoint(on_meta, tmp_path)


def test_integer_tensor_is_named(tmp_path):
    llama.save_checkpoint(tiny(), tmp_path)
    state = load_file(tmp_path / SINGLE_FILE)
    state["model.layers.1.self_attn.k_proj.weight"] = state["model.layers.1.self_attn.k_proj.weight"].to(torch.int32)
    save_file(state, tmp_path / SINGLE_FILE)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*torch\.int32"):
        llama.load_checkpoint(None, tmp_path)


def test_truncated_shard_is_named(tmp_path):
    paths = llama.save_checkpoint(tiny(), tmp_path, max_shard_bytes=20_000)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=paths[1].name):
        llama.load_checkpoint(None, tmp_path)


def fail_after_config(monkeypatch):
    finish = StreamingWriter.finish

    def then_fail(self, config):
        finish(self, config)
        raise OSError("disk full after config.json")
    monkeypatch.setattr(StreamingWriter, "finish", then_fail)


def fail_after_a_shard(monkeypatch):
    open_next = StreamingWriter._open_next_shard

    def fail_on_the_second(self):
        if self._shard == 0:
            raise OSError("disk full after the first shard")
        open_next(self)
    monkeypatch.setattr(StreamingWriter, "_open_next_shard", fail_on_the_second)


def fail_at_the_second_rename(monkeypatch):
    """A failing ``os.replace`` after the first one succeeded, whichever files the save renames."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full at the second rename")
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fault", [fail_after_config, fail_after_a_shard, fail_at_the_second_rename])
def test_a_failed_save_leaves_the_previous_checkpoint_whole_and_loadable(tmp_path, monkeypatch, fault):
    previous = tiny()
    llama.save_checkpoint(previous, tmp_path / "ckpt", max_shard_bytes=40_000)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    fault(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        llama.save_checkpoint(tiny(intermediate_size=128), tmp_path / "ckpt", max_shard_bytes=40_000)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left beside it
    assert_same_weights(previous, llama.load_checkpoint(None, tmp_path / "ckpt"))


def test_a_save_keeps_the_directorys_other_files_and_drops_stale_shards(tmp_path):
    model = tiny()
    llama.save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    llama.save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", SINGLE_FILE, "tokenizer.json"]
    assert_same_weights(model, llama.load_checkpoint(None, tmp_path / "ckpt"))
