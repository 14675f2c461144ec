"""Building the model (recipe/build.py), the adapter it writes (recipe/adapter.py), and the clear errors."""
from pathlib import Path

import pytest
import torch

from distributed import run_on_ranks
from reference_libs import reference
from test_recipe_train import FAST, _train_one

import lora
from recipe.build import BuildOptions, build
from recipe.twins import reset_lora_init


def test_build_streams_quantizes_and_wraps_every_target(tiny_model):
    built = build(BuildOptions(model=tiny_model, quant="nf4", shard="none", rank=4))
    names = dict(built.model.named_modules())
    assert len(built.lora_names) == 2 * 7 and "model.layers.1.mlp.down_proj" in built.lora_names
    assert type(names["model.layers.0.self_attn.q_proj.base_layer"]).__name__ == "Linear4bit"
    assert not any(p.is_meta for p in built.model.parameters())
    assert {id(p) for p in built.parameters} == {id(p) for p in lora.trainable_parameters(built.model)}
    ids = torch.randint(0, 256, (2, 8))
    base_logits = build(BuildOptions(model=tiny_model, quant="nf4", shard="none")).model(ids)
    torch.testing.assert_close(built.model(ids), base_logits)  # B = 0: the adapter changes nothing yet


def test_lora_init_depends_on_seed_and_name_only(tiny_model):
    a = build(BuildOptions(model=tiny_model, quant="none", shard="none", seed=3)).model
    b = build(BuildOptions(model=tiny_model, quant="none", shard="none", seed=3)).model
    c = build(BuildOptions(model=tiny_model, quant="none", shard="none", seed=4)).model
    key = "model.layers.1.self_attn.v_proj.lora_A.weight"
    pa, pb, pc = (dict(m.named_parameters())[key] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert pa.abs().max() <= 1 / 64 ** 0.5  # Kaiming-uniform bound 1/sqrt(in_features)
    before = pa.clone()
    reset_lora_init(a, 3)
    assert torch.equal(before, pa)


def test_bad_options_and_targets_that_match_nothing(tiny_model):
    with pytest.raises(ValueError, match="--quant"):
        BuildOptions(quant="int3")
    with pytest.raises(ValueError, match="fsdp2"):
        BuildOptions(quant="bnb", shard="fsdp2")
    with pytest.raises(ValueError, match="qkv_proj"):
        build(BuildOptions(model=tiny_model, quant="none", shard="none", target_modules=("q_proj", "qkv_proj")))


def test_world_size_larger_than_the_data_can_feed_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(RuntimeError, match="world size 2 is larger than this run can use"):
        run_on_ranks(_train_one, 2, args=(tiny_model, tmp_path, ["--batch-size", "100000", "--steps", "1"]))


def test_a_batch_that_cannot_fit_the_plan_warns_with_the_plan(tiny_model):
    import llama
    from recipe.job import check_plan
    from recipe.train import job_config, parse_args

    messages = []
    check_plan(job_config(parse_args(["--memory-gib", "0.001", "--batch-size", "64"])),
               llama.LlamaConfig.from_hf(tiny_model), 2, messages.append)
    assert len(messages) == 1 and "exceeds" in messages[0] and "DOES NOT FIT" in messages[0]
    messages.clear()
    check_plan(job_config(parse_args(["--memory-gib", "64"])), llama.LlamaConfig.from_hf(tiny_model), 2,
               messages.append)
    assert messages == []


@pytest.fixture(scope="module")
def trained_adapter(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run_on_ranks(_train_one, 1, args=(tiny_model, out, ["--steps", "6", "--eval-every", "6", *FAST]))
    return out / "adapter"


def test_trained_adapter_loads_in_peft_on_the_hf_model(tiny_model, trained_adapter):
    peft, transformers = reference("peft"), reference("transformers")
    from recipe.adapter import load_onto_base

    ours = load_onto_base(tiny_model, trained_adapter).eval()
    assert any(p.abs().sum() > 0 for n, p in ours.named_parameters() if "lora_B" in n)  # it was trained
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(trained_adapter)).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_an_adapter_from_another_base_is_refused_by_name(tmp_path, trained_adapter):
    import llama
    from recipe.adapter import load_onto_base

    other = llama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=258)
    llama.save_checkpoint(llama.Llama(other), tmp_path)
    with pytest.raises(ValueError, match=r"another base.*hidden_size"):
        load_onto_base(tmp_path, trained_adapter)
    assert Path(trained_adapter, "adapter_model.safetensors").is_file()


def test_a_prequantized_bitsandbytes_checkpoint_loads_without_dequantizing(tiny_model, tmp_path):
    """Every linear stored as bitsandbytes 4-bit (quantized by bitsandbytes itself): build keeps its bytes."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    bnb = reference("bitsandbytes")

    state, stored = load_file(tiny_model / "model.safetensors"), {}
    for name in [n for n in state if n.endswith("_proj.weight")]:
        w = state.pop(name)
        packed, quant_state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        stored[name] = packed
        state[name] = packed
        state.update({f"{name}.{k}": v for k, v in quant_state.as_dict(packed=True).items()})
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(tiny_model / "config.json", tmp_path / "config.json")
    built = build(BuildOptions(model=tmp_path, quant="nf4", shard="none"))
    for name, packed in stored.items():
        layer = built.model.get_submodule(name[:-len(".weight")] + ".base_layer")
        assert torch.equal(layer.weight_packed.reshape(-1), packed.reshape(-1)), name  # the very same bytes
    reference_build = build(BuildOptions(model=tiny_model, quant="nf4", shard="none"))
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(built.model(ids), reference_build.model(ids))  # nf4 quantizes bit-exactly like bnb
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 64
    with pytest.raises(ValueError, match="pre-quantized"):
        build(BuildOptions(model=tmp_path, quant="none", shard="none"))


def test_resuming_onto_another_base_or_setting_is_refused(tiny_model, tmp_path):
    """A checkpoint written for one base / one set of flags cannot be resumed with another."""
    flags = ["--steps", "4", "--save-every", "2", "--eval-every", "4", *FAST]
    run_on_ranks(_train_one, 1, args=(tiny_model, tmp_path, flags))
    with pytest.raises(RuntimeError, match=r"other settings: build.rank: 4 in the checkpoint, 2 now"):
        run_on_ranks(_train_one, 1, args=(tiny_model, tmp_path, [*flags, "--resume", "--rank", "2"]))


def _twin_state_round_trip(rank, world, model):
    """For each sharder: one AdamW step, then its local state saved, scrambled and loaded back."""
    from recipe.data import Batch

    result = {}
    for shard in ("ours", "fsdp2", "none"):
        trainable = build(BuildOptions(model=model, shard=shard, rank=4)).trainable
        optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-2)
        batch = Batch.of_text(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank)))
        trainable.forward(**batch.model_inputs())[1].backward()
        norm = trainable.clip_grad_norm_(1.0)
        assert isinstance(norm, torch.Tensor) and norm.dim() == 0  # a tensor: clipping does not wait for the device
        norm = norm.item()
        optimizer.step()
        saved = trainable.local_state(optimizer)
        with torch.no_grad():
            for p in trainable.parameters():
                p.zero_()
        optimizer.state.clear()
        trainable.load_local_state(optimizer, saved)
        assert all(torch.equal(saved[k], v) for k, v in trainable.local_state(optimizer).items())
        full = trainable.trainable_state_dict()
        result[shard] = (norm, None if full is None else {k.replace(".default", ""): v for k, v in full.items()})
    return result


def test_every_sharder_saves_and_restores_its_local_state_and_gathers_the_same_adapter(tiny_model):
    ranks = run_on_ranks(_twin_state_round_trip, 2, args=(tiny_model,), timeout_s=300)
    assert all(state is None for _, state in ranks[1].values())          # the full state lands on rank 0 only
    ours_norm, ours = ranks[0]["ours"]
    assert len(ours) == 2 * 2 * 7 and all(t.dtype == torch.float32 for t in ours.values())
    for shard in ("fsdp2", "none"):
        norm, theirs = ranks[0][shard]
        assert theirs.keys() == ours.keys()
        assert norm == pytest.approx(ours_norm, rel=1e-4)
        for name, tensor in ours.items():
            torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-6, msg=f"--shard {shard}: {name}")
