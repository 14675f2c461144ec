"""Every command's user errors: one line ``error: ...`` on stderr, exit status 2, no traceback (``--debug``
shows it), printed by rank 0 only; and the rule that decides what a user error is (``llama.cli``).

The commands run in-process (``run_command(main, argv)``) to stay fast; one runs under torchrun with two
ranks to show a single error line.
"""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import assert_one_line, run_as_command
from llama import cli

ROOT = Path(__file__).resolve().parent.parent


# --- the rule ---------------------------------------------------------------------------------------

def caught(action) -> BaseException:
    try:
        action()
    except BaseException as error:  # noqa: B036 -- the test inspects whatever was raised
        return error
    pytest.fail("nothing was raised")


def test_a_user_error_is_one_the_projects_validation_raised_or_an_oserror(tmp_path):
    import llama

    assert cli.is_user_error(caught(lambda: llama.LlamaConfig.preset("llama-1b")))  # a raise in llama/config.py
    assert cli.is_user_error(caught(lambda: open(tmp_path / "missing")))           # OSError: names the path
    assert not cli.is_user_error(caught(lambda: json.loads("{")))                  # ValueError inside the stdlib
    assert not cli.is_user_error(caught(lambda: cli.integer(minimum="1")("3")))    # TypeError of a bad call in ours
    assert not cli.is_user_error(caught(lambda: {}["key"]))                       # KeyError: never a user error


def test_run_command_turns_only_user_errors_into_one_line(capsys):
    import llama

    def main(argv):
        if argv[0] == "preset":
            llama.LlamaConfig.preset("llama-1b")
        return {}["key"]

    assert_one_line(*run_as_command(main, ["preset"], capsys), "unknown preset 'llama-1b'")
    with pytest.raises(ValueError, match="unknown preset"):
        run_as_command(main, ["preset", "--debug"], capsys)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_as_command(main, ["bug"], capsys)


def test_only_rank_0_prints(monkeypatch, capsys):
    parser = cli.Parser(prog="x")
    parser.add_argument("--n", type=cli.integer(minimum=1))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--n", "0"])
    assert exit.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        parser.parse_args(["--n", "0"])
    assert capsys.readouterr().err == "error: argument --n: expected an integer >= 1, got '0'\n"


def test_numbers_are_finite_and_inside_their_bounds():
    parse = cli.number(minimum=0, below=1)
    assert parse("0") == 0.0 and parse("0.5") == 0.5
    for text in ("1", "-0.1", "nan", "inf", "x"):
        with pytest.raises(Exception, match=f"expected a finite number >= 0 and < 1, got '{text}'"):
            parse(text)


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_on_one():
    stream = Stream(tty=False)
    bar = cli.progress(total=10, initial=2, desc="train", every=4, stream=stream)
    for step in range(3, 11):
        bar.set_postfix(loss=f"{1 / step:.2f}")
        bar.update(1)
    bar.close()
    assert stream.getvalue().splitlines() == ["train: 4/10 loss=0.25", "train: 8/10 loss=0.12",
                                                    "train: 10/10 loss=0.10"]
    from tqdm import tqdm

    assert isinstance(cli.progress(total=3, stream=Stream(tty=True)), tqdm)


# --- each command -------------------------------------------------------------------------------------

def test_pretrain_flags(capsys):
    from llama.pretrain import main

    for argv, expected in ((["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
                           (["--seq-len", "1"], "argument --seq-len: expected an integer >= 2, got '1'"),
                           (["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
                           (["--heads", "3"], "argument --hidden: expected a multiple of 2 x --heads (6"),
                           (["--kv-heads", "3"], "argument --kv-heads: expected a divisor of --heads (8), got 3"),
                           (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'")):
        assert_one_line(*run_as_command(main, ["--out", "/nonexistent", *argv], capsys), expected)


def test_measure_flags(capsys):
    from recipe.measure import main

    for argv, expected in ((["--nproc", "0"], "argument --nproc: expected an integer >= 1, got '0'"),
                           (["--seq-len", "0"], "argument --seq-len: expected an integer >= 2, got '0'"),
                           (["--layers", "-1"], "argument --layers: expected an integer >= 1, got '-1'"),
                           (["--preset", "llama-1b"], "argument --preset: expected one of"),
                           (["--quant", "int8"], "argument --quant: invalid choice: 'int8'")):
        assert_one_line(*run_as_command(main, argv, capsys), expected)


def test_train_under_torchrun_prints_one_error_line_for_all_ranks(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "recipe.train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: --data {tmp_path / 'missing'} is neither a file nor a directory"], result.stderr
    assert "recipe/" not in result.stderr  # no traceback through our code (torchrun adds its own summary)


BENCHMARK_FLAGS = [
    ("benchmarks.e2e", ["--ranks", "0"], "argument --ranks: expected an integer >= 1, got '0'"),
    ("benchmarks.e2e", ["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    ("benchmarks.e2e_library", ["--grad-accum", "0"], "argument --grad-accum: expected an integer >= 1, got '0'"),
    ("benchmarks.packing", ["--seq-len", "1"], "argument --seq-len: expected an integer >= 2, got '1'"),
    ("benchmarks.sharding", ["--dim", "12", "--heads", "4"], "argument --dim: expected a multiple of 2 x --heads (8"),
    ("benchmarks.sharding", ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
    ("benchmarks.lora", ["--tokens", "0"], "argument --tokens: expected an integer >= 1, got '0'"),
    ("benchmarks.nf4", ["--threads", "x"], "argument --threads: expected an integer >= 1, got 'x'"),
    ("benchmarks.quant_quality", ["--model", "/nonexistent"], "argument --model: no config.json in /nonexistent"),
    ("recipe.microbench", ["--ranks", "0"], "argument --ranks: expected an integer >= 1, got '0'"),
    ("recipe.microbench", ["--repeats", "x"], "argument --repeats: expected an integer >= 1, got 'x'"),
]


@pytest.mark.parametrize("module,argv,expected", BENCHMARK_FLAGS, ids=[f"{m} {' '.join(a)}" for m, a, _ in BENCHMARK_FLAGS])
def test_benchmark_flags(module, argv, expected, capsys):
    import importlib

    assert_one_line(*run_as_command(importlib.import_module(module).main, argv, capsys), expected)


def test_generate_and_export_flags(capsys):
    from recipe import export, generate

    assert_one_line(*run_as_command(generate.main, ["--prompt", "x", "--top-k", "0"], capsys),
                    "argument --top-k: expected an integer >= 1, got '0'")
    assert_one_line(*run_as_command(export.main, ["--model", "m", "--adapter", "a", "--out", "o", "--max-shard-size", "lots"],
                             capsys), "--max-shard-size must be a positive size such as 5GB or 500MiB, got 'lots'")


def test_plan_flags(capsys):
    from recipe.plan import main

    for argv, expected in ((["--gpu-gib", "nan"], "argument --gpu-gib: expected a finite number > 0, got 'nan'"),
                           (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
                           (["llama-9"], "unknown preset 'llama-9'")):
        assert_one_line(*run_as_command(main, argv, capsys), expected)
