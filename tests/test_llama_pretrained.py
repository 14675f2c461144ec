"""The bundled pretrained base (llama/assets/tiny-llama), the pretraining script, and the 4-bit quality ordering."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from reference_libs import reference

import llama
from llama.corpus import stdlib_tokens, windows
from llama.pretrain import evaluate, main as pretrain_main, unigram_loss

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "llama" / "assets" / "tiny-llama"


def quant_quality():
    spec = importlib.util.spec_from_file_location("quant_quality", ROOT / "benchmarks" / "quant_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and far faster when the CPU is shared (CI, other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def heldout():
    return stdlib_tokens("heldout")


def test_bundled_model_fits_the_budget_and_has_gqa():
    files = {p.name: p.stat().st_size for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors"} <= set(files)
    assert files["config.json"] + files["model.safetensors"] <= 10 * 2**20
    config = llama.LlamaConfig.from_hf(BUNDLED)
    assert config.num_key_value_heads < config.num_attention_heads and config.num_hidden_layers >= 4
    assert config.vocab_size == llama.ByteTokenizer.vocab_size
    assert isinstance(llama.load_tokenizer(BUNDLED), llama.ByteTokenizer)


def test_bundled_model_is_pretrained_far_below_the_byte_unigram_baseline(heldout):
    model = llama.load_checkpoint(None, BUNDLED).float()
    held = windows(heldout, model.config.max_position_embeddings, max_windows=24)
    loss = evaluate(model, held)
    baseline = unigram_loss(stdlib_tokens("train"), held.flatten())
    assert loss < 0.75 * baseline, (loss, baseline)
    logged = json.loads((BUNDLED / "pretrain_log.json").read_text())
    assert logged["final_heldout_loss_bf16"] < 0.75 * logged["unigram_heldout_loss"]


def test_pretrain_script_is_deterministic_and_writes_a_loadable_checkpoint(tmp_path):
    """Same command, same bytes: the bundled weights are what ``python -m llama.pretrain`` produces."""
    args = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-windows", "4",
            "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "64"]
    log = pretrain_main(["--out", str(tmp_path / "a"), *args])
    pretrain_main(["--out", str(tmp_path / "b"), *args])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    model = llama.load_checkpoint(None, tmp_path / "a")
    assert model.config.hidden_size == 32 and model.lm_head.weight.dtype == torch.bfloat16
    assert [point["step"] for point in log["curve"]] == [2, 3]
    logged = json.loads((tmp_path / "a" / "pretrain_log.json").read_text())
    assert logged["final_heldout_loss_bf16"] == pytest.approx(log["final_heldout_loss_bf16"])


def test_int4_absmax_lands_on_15_levels_per_block():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    q = quant_quality().int4_absmax(w).reshape(-1, 64)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    levels = q / absmax * 7
    torch.testing.assert_close(levels, levels.round(), atol=1e-5, rtol=0)
    assert (q - w.reshape(-1, 64)).abs().max() <= (absmax / 14).max() + 1e-6


def test_nf4_is_the_best_4bit_format_on_the_pretrained_model(heldout):
    """QLoRA's ordering (Dettmers et al. 2023, Table 2): NF4 beats FP4 and plain int4 at 4 bits."""
    reference("bitsandbytes")
    qq = quant_quality()
    config = llama.LlamaConfig.from_hf(BUNDLED)
    held = windows(heldout, config.max_position_embeddings, max_windows=24)
    losses = qq.heldout_losses(BUNDLED, held)
    assert losses["NF4 (ours)"] < losses["FP4 (bnb)"], losses
    assert losses["NF4 (ours)"] < losses["Int4 absmax"], losses
    assert abs(losses["NF4 (ours)"] - losses["NF4 (bnb)"]) < 0.01, losses
