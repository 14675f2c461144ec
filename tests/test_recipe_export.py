"""recipe.export: merged checkpoints that transformers loads with PEFT's merged logits, streamed and atomic."""
import dataclasses
import json

import pytest
import torch
from reference_libs import reference
from safetensors import safe_open
from test_llama_generate import random_checkpoint  # noqa: F401 (a fixture)
from test_recipe_generate import random_adapter

import llama
from recipe import export as cli
from recipe import generate
from llama.cli import run_command as run

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))


def hf_logits(directory):
    transformers = reference("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("options", [{}, {"rslora": True}, {"dora": True}], ids=["lora", "rslora", "dora"])
def test_export_loads_in_transformers_with_peft_merged_logits(random_checkpoint, tmp_path, options):  # noqa: F811
    transformers, peft = reference("transformers"), reference("peft")
    adapter = random_adapter(random_checkpoint, tmp_path / "adapter", **options)
    (random_checkpoint / "tokenizer_config.json").write_text("{}")
    files = cli.export(random_checkpoint, adapter, tmp_path / "out", dtype=torch.float32, max_shard_bytes=60_000)
    assert len(files) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    base = transformers.LlamaForCausalLM.from_pretrained(random_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(IDS).logits
        expected = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()(IDS).logits
    assert (hf_logits(tmp_path / "out") - expected).abs().max() < 1e-4
    ours = llama.load_checkpoint(None, tmp_path / "out").eval()
    with torch.no_grad():
        assert (ours(IDS) - expected).abs().max() < 1e-4
        unmerged = generate.load_model(random_checkpoint, adapter)(IDS)
    assert (unmerged - expected).abs().max() < 1e-4 and (unmerged - base_logits).abs().max() > 1e-2


def test_export_from_nf4_is_the_dequantized_base_plus_the_update(random_checkpoint, tmp_path):  # noqa: F811
    adapter = random_adapter(random_checkpoint, tmp_path / "adapter")
    said = []
    cli.export(random_checkpoint, adapter, tmp_path / "out", dtype=torch.float32, quant="nf4", log=said.append)
    assert any("dequantized" in line for line in said)
    with torch.no_grad():
        unmerged = generate.load_model(random_checkpoint, adapter, quant="nf4")(IDS)
    assert (hf_logits(tmp_path / "out") - unmerged).abs().max() < 1e-4


def test_bf16_single_file_and_config_read_back(random_checkpoint, tmp_path):  # noqa: F811
    adapter = random_adapter(random_checkpoint, tmp_path / "adapter")
    cli.main(["--model", str(random_checkpoint), "--adapter", str(adapter), "--out", str(tmp_path / "out")])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    expected = dataclasses.replace(llama.LlamaConfig.from_hf(random_checkpoint), torch_dtype="bfloat16")
    assert config["torch_dtype"] == "bfloat16" and llama.LlamaConfig.from_hf(config) == expected


def test_a_failed_export_leaves_the_previous_output_whole(random_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    adapter = random_adapter(random_checkpoint, tmp_path / "adapter")
    out = tmp_path / "out"
    cli.export(random_checkpoint, adapter, out, max_shard_bytes=60_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written = []

    def failing_write(self, name, tensor):
        written.append(name)
        if len(written) == 7:
            raise OSError("disk full")
        original(self, name, tensor)

    original = cli.StreamingWriter.write
    monkeypatch.setattr(cli.StreamingWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        cli.export(random_checkpoint, adapter, out, dtype=torch.float32, max_shard_bytes=60_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]  # no temporary directory left


@pytest.mark.parametrize("argv, message", [
    (["--max-shard-size", "lots"], "--max-shard-size must be a positive size"),
    (["--max-shard-size", "0GB"], "--max-shard-size"),
    (["--dtype", "int8"], "--dtype"),
    (["--adapter", "/no/such/adapter"], "adapter_config.json"),
    (["--model", "/no/such/model"], "no Llama config"),
    (["--out", "MODEL"], "is the --model directory"),
])
def test_cli_user_errors_are_one_line_and_exit_2(random_checkpoint, tmp_path, argv, message, capsys):  # noqa: F811
    adapter = random_adapter(random_checkpoint, tmp_path / "adapter")
    defaults = {"--model": str(random_checkpoint), "--adapter": str(adapter), "--out": str(tmp_path / "out")}
    given = dict(zip(argv[::2], argv[1::2]))
    given = {k: (str(random_checkpoint) if v == "MODEL" else v) for k, v in given.items()}
    args = [item for key, value in {**defaults, **given}.items() for item in (key, value)]
    with pytest.raises(SystemExit) as exit_info:
        run(cli.main, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert cli.parse_size("5GB") == 5 * 10**9 and cli.parse_size("500MiB") == 500 * 2**20 and cli.parse_size("1000") == 1000
