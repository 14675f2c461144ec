"""recipe's bad inputs: every numeric flag of recipe.train refused while parsing (before any model loads),
user errors after parsing as one line, and resume refusing what it cannot continue, naming the setting.

No case may end in IndexError/KeyError/AttributeError/ZeroDivisionError or a traceback: each is either
an argparse-style ``error: argument --flag: ...`` line or ``error: ...`` naming the input, status 2.
"""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from cli_run import assert_one_line, exit_status_and_stderr
from distributed import run_on_ranks

FAST = ["--dtype", "fp32", "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--eval-batches", "1", "--no-progress"]


BAD_TRAIN_FLAGS = [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--steps", "x"], "argument --steps: expected an integer >= 1, got 'x'"),
    (["--grad-accum", "0"], "argument --grad-accum: expected an integer >= 1, got '0'"),
    (["--eval-every", "0"], "argument --eval-every: expected an integer >= 1, got '0'"),
    (["--save-every", "0"], "argument --save-every: expected an integer >= 1, got '0'"),
    (["--eval-batches", "0"], "argument --eval-batches: expected an integer >= 1, got '0'"),
    (["--seq-len", "0"], "argument --seq-len: expected an integer >= 2, got '0'"),
    (["--seq-len", "-1"], "argument --seq-len: expected an integer >= 2, got '-1'"),
    (["--seq-len", "1"], "argument --seq-len: expected an integer >= 2, got '1'"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--rank", "0"], "argument --rank: expected an integer >= 1, got '0'"),
    (["--shard-size", "0"], "argument --shard-size: expected an integer >= 1, got '0'"),
    (["--alpha", "inf"], "argument --alpha: expected a finite number > 0, got 'inf'"),
    (["--alpha", "0"], "argument --alpha: expected a finite number > 0, got '0'"),
    (["--dropout", "1"], "argument --dropout: expected a finite number >= 0 and < 1, got '1'"),
    (["--dropout", "-0.1"], "argument --dropout: expected a finite number >= 0 and < 1, got '-0.1'"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["--max-grad-norm", "0"], "argument --max-grad-norm: expected a finite number > 0, got '0'"),
    (["--warmup", "0"], "argument --warmup: expected an integer >= 1, got '0'"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    (["--samples", "-1"], "argument --samples: expected an integer >= 0, got '-1'"),
    (["--memory-gib", "-2"], "argument --memory-gib: expected a finite number > 0, got '-2'"),
    (["--target-modules", "q_proj,,v_proj"], "argument --target-modules: expected comma-separated module names"),
    (["--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
]


@pytest.mark.parametrize("argv,expected", BAD_TRAIN_FLAGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_FLAGS])
def test_a_bad_train_flag_is_one_line_before_anything_loads(argv, expected, capsys, monkeypatch):
    import recipe.train

    monkeypatch.setattr(recipe.train, "run_job", lambda *a: pytest.fail("the job started"))
    assert_one_line(*exit_status_and_stderr(recipe.train.cli, [*argv, "--out", "/nonexistent/never-written"], capsys),
                    expected)


def test_user_errors_after_parsing_are_one_line_naming_the_input(tmp_path, capsys, tiny_model):
    """One process (recipe.train.cli starts a one-rank group and closes it)."""
    from recipe.train import cli

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    (tmp_path / "empty").mkdir()
    cases = [(["--data", str(tmp_path / "missing.txt")], "missing.txt is neither a file nor a directory"),
             (["--data", str(tmp_path / "empty")], "holds no"),
             (["--data", str(tiny)], "a split of 3 tokens is shorter than seq_len=32"),
             (["--model", str(tmp_path / "no-model")], "no-model")]
    for argv, expected in cases:
        assert_one_line(*exit_status_and_stderr(cli, ["--model", str(tiny_model), "--tokenizer", "byte", *FAST, "--steps",
                                                      "1", "--out", str(tmp_path / "o"), *argv], capsys), expected)


def test_the_fingerprint_covers_every_field_but_those_that_may_change(tiny_model):
    """Built from the JobConfig fields: a new option is checked without being listed anywhere."""
    import llama
    from recipe.build import BuildOptions
    from recipe.fingerprint import MAY_CHANGE, differences, of_job
    from recipe.job import JobConfig
    from recipe.loop import LoopConfig

    model_config = llama.LlamaConfig.from_hf(tiny_model)
    config = JobConfig(build=BuildOptions(model=tiny_model), loop=LoopConfig(steps=10), seq_len=128)
    fp = of_job(config, model_config)
    assert json.loads(json.dumps(fp)) == fp  # what the checkpoint's JSON holds compares equal after the round trip
    for name in ("build.dora", "build.rank", "build.alpha", "build.dropout", "build.target_modules", "build.quant",
                 "build.compute_dtype", "build.seed", "seq_len", "batch_size", "loop.grad_accum", "loop.lr",
                 "build.model.config.hidden_size", "build.model.files.model.safetensors"):
        assert name in fp, name
    assert not any(key.startswith(tuple(MAY_CHANGE)) for key in fp)
    changed = dataclasses.replace(config, build=dataclasses.replace(config.build, dora=True, rank=16), seq_len=64,
                                  loop=dataclasses.replace(config.loop, save_every=7, out=Path("elsewhere")),
                                  profile=True, samples=2)
    assert differences(fp, of_job(changed, model_config)) == (
        "build.dora: False in the checkpoint, True now; build.rank: 8 in the checkpoint, 16 now; "
        "seq_len: 128 in the checkpoint, 64 now")


def test_the_data_fingerprint_is_its_files_sizes_and_hashes(tmp_path, tiny_model):
    import llama
    from recipe.build import BuildOptions
    from recipe.fingerprint import differences, of_job
    from recipe.job import JobConfig
    from recipe.loop import LoopConfig

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one")
    model_config = llama.LlamaConfig.from_hf(tiny_model)
    config = JobConfig(build=BuildOptions(model=tiny_model), loop=LoopConfig(), data=str(tmp_path / "d"))
    before = of_job(config, model_config)
    (tmp_path / "d" / "a.txt").write_text("two")
    assert differences(before, of_job(config, model_config)).startswith("data.files.a.txt: [3, '")


def _resume_with_other_settings(rank, world, model, out, data, other_data):
    """Train 2 steps (a checkpoint at step 1), then resume with other settings; return each error."""
    from recipe.train import main

    common = ["--model", model, "--tokenizer", "byte", *FAST, "--out", out, "--data", data]
    main([*common, "--steps", "2", "--save-every", "1"])
    errors = {}
    for name, extra in {"dora": ["--dora"], "rank": ["--rank", "8"], "seq-len": ["--seq-len", "16"],
                        "data": ["--data", other_data]}.items():
        try:
            main([*common, "--steps", "2", "--resume", *extra])
        except ValueError as error:
            errors[name] = str(error)
    resumed = main([*common, "--steps", "2", "--resume", "--eval-every", "5"])  # may change: resumes
    return errors, resumed["steps"]


def test_resume_with_other_settings_names_each_one(tmp_path, tiny_model):
    text, other = tmp_path / "text.txt", tmp_path / "other.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    other.write_text("Pack my box with five dozen liquor jugs. " * 400)
    for rank_errors, steps in run_on_ranks(_resume_with_other_settings, world_size=2, timeout_s=300,
                                           args=(str(tiny_model), str(tmp_path / "run"), str(text), str(other))):
        assert "build.dora: False in the checkpoint, True now" in rank_errors["dora"]
        assert "build.rank: 4 in the checkpoint, 8 now" in rank_errors["rank"]
        assert "seq_len: 32 in the checkpoint, 16 now" in rank_errors["seq-len"]
        assert re.search(r"data\.\S+: .+ in the checkpoint, .+ now", rank_errors["data"]), rank_errors["data"]
        assert steps == 1  # resumed from step 1: one step left


def test_an_empty_token_batch_is_refused_by_name_not_inside_attention(tiny_model):
    import torch

    import llama
    from recipe.data import Batch
    from recipe.twins.sharders import Unsharded

    model = Unsharded(llama.load_checkpoint(None, tiny_model))
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(2, 0\)\)"):
        model.forward(**Batch.of_text(torch.empty(2, 0, dtype=torch.int64)).model_inputs())
