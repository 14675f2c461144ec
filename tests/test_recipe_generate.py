"""recipe.generate: NF4 + unmerged LoRA generation against transformers + PEFT over bitsandbytes, and the CLI."""
import pytest
import torch
from reference_libs import reference
from test_llama_generate import hf_greedy, random_checkpoint  # noqa: F401 (a fixture)

import llama
from llama.pretrain import BUNDLED_MODEL
import lora
from recipe import generate as cli
from recipe.plan import ALL_LINEAR
from llama.cli import run_command as run

BUNDLED = str(BUNDLED_MODEL)


def random_adapter(model_dir, directory, **options):
    model = cli.load_model(model_dir)
    lora.inject(model, ALL_LINEAR, r=4, alpha=8, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    lora.save_adapter(model, directory)
    return directory


def peft_over_bnb(model_dir, adapter_dir):
    """transformers' Llama, every decoder linear a bitsandbytes NF4 Linear4bit (block 64, double quant,
    fp32 compute), with PEFT loading the same adapter (PEFT's bitsandbytes LoRA layers).

    Left in training mode (no dropout anywhere, so the same function): there bitsandbytes' CPU forward
    dequantizes and multiplies, as we do, and agrees with ours exactly. In eval mode it repacks the
    weight for its CPU inference kernel, whose outputs differ from dequantize-then-matmul by up to
    8e-3 on a 64 -> 128 layer (measured with bitsandbytes 0.50), enough to change the logits at 1e-2."""
    transformers, bnb, peft = (reference(name) for name in ("transformers", "bitsandbytes", "peft"))
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in ALL_LINEAR:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(module.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))  # bitsandbytes quantizes on .to
    model.is_loaded_in_4bit = True
    return peft.PeftModel.from_pretrained(model, adapter_dir).train()


def test_nf4_lora_greedy_equals_transformers_peft_over_bitsandbytes(random_checkpoint, tmp_path):  # noqa: F811
    adapter = random_adapter(random_checkpoint, tmp_path / "adapter", rslora=True)
    ours = cli.load_model(random_checkpoint, adapter, quant="nf4")
    theirs = peft_over_bnb(random_checkpoint, adapter)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
        base = (ours(ids) - cli.load_model(random_checkpoint, quant="nf4")(ids)).abs().max().item()
    assert diff < 1e-4 and base > 1e-2  # the same function, and the adapter changes it
    prompts = [ids[0, :7].tolist(), ids[1].tolist()]
    assert llama.generate(ours, prompts, 10, stop_ids=[2]) == hf_greedy(theirs, prompts, 10, eos=2)


def test_cli_streams_the_greedy_completion_and_reports_speeds(capsys):
    report = cli.main(["--model", BUNDLED, "--prompt", "import os\n", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    model = cli.load_model(BUNDLED)
    tok = llama.ByteTokenizer()
    expected = tok.decode(llama.generate(model, [tok.encode("import os\n")], 12, stop_ids=[tok.eos_token_id])[0])
    assert out == "import os\n" + expected + "\n" and report["completions"] == [expected]
    assert report["prompt_tokens"] == 11 and report["decode_tokens"] == 11
    assert report["prompt_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0 and report["peak_mib"] > 0
    assert "tokens/s" in err and "peak memory" in err


def test_cli_batch_from_a_file_with_nf4_and_an_adapter(tmp_path, capsys):
    adapter = random_adapter(BUNDLED, tmp_path / "adapter")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n\nclass A:\n")
    report = cli.main(["--model", BUNDLED, "--adapter", str(adapter), "--quant", "nf4", "--prompts", str(prompts),
                       "--max-new-tokens", "3", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"])
    assert len(report["completions"]) == 2 and report["prompt_tokens"] == 10 + 9 and report["decode_tokens"] == 4
    out = capsys.readouterr().out
    assert out.startswith("def f(x):" + report["completions"][0]) and "class A:" + report["completions"][1] in out


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got '0'"),
    (["--prompt", "x", "--top-k", "two"], "--top-k"),
    (["--prompt", "x", "--quant", "int3"], "--quant"),
    (["--max-new-tokens", "3"], "--prompt"),
    (["--prompt", "x", "--temperature", "-1"], "argument --temperature: expected a finite number >= 0, got '-1'"),
    (["--prompt", "x", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["--prompt", "x", "--top-p", "2"], "argument --top-p: expected a finite number > 0 and <= 1, got '2'"),
    (["--prompt", "x", "--model", "/no/such/dir"], "no Llama config"),
    (["--prompts", "/no/such/file"], "--prompts /no/such/file: no such file"),
    (["--prompt", "x", "--adapter", "/no/such/adapter"], "adapter_config.json"),
])
def test_cli_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(cli.main, ["--model", BUNDLED, *argv] if "--model" not in argv else argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)):
        run(cli.main, [*argv, "--debug"])
