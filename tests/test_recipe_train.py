"""The composed loop (recipe/train.py, job.py, loop.py, build.py, checkpoint.py, adapter.py) on 2 real gloo ranks.

A tiny random Llama (2 layers, hidden 64: ``tiny_model`` in conftest.py) is written once per session;
every run fine-tunes it on short windows of the pydoc corpus. Swapping ONE component for the library
version must give the same loss curve as ours: bitsandbytes' Linear4bit (identical NF4 bytes) and FSDP2 within 1e-4 relative,
PEFT's LoRA (same math, different operation order) within 1e-3 relative, over 20 steps. Activation
checkpointing (recomputes the same forward) within 1e-6, and offload (a no-op move on CPU) exactly.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import free_port, run_on_ranks
from reference_libs import reference

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--data", "pydoc", "--samples", "0", "--dtype", "fp32", "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--eval-batches", "2", "--no-progress"]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_variants(rank, world, model, base_out, variants):
    from recipe.train import main

    return {name: main(["--model", str(model), "--out", str(Path(base_out) / name), *flags])
            for name, flags in variants.items()}


@pytest.mark.slow
def test_swapping_one_component_gives_the_same_loss_curve(tiny_model, tmp_path):
    reference("bitsandbytes"), reference("peft")
    common = ["--steps", "20", "--eval-every", "20", *FAST]
    variants = {"ours": common, "bnb": ["--quant", "bnb", *common], "peft": ["--lora", "peft", *common],
                "fsdp2": ["--shard", "fsdp2", *common], "checkpointing": ["--activation-checkpointing", *common],
                "offload": ["--offload", *common]}
    summaries = run_on_ranks(_train_variants, 2, args=(tiny_model, tmp_path, variants), timeout_s=300)[0]
    ours = torch.tensor(losses(tmp_path / "ours"))
    assert len(ours) == 20 and ours[-5:].mean() < ours[:5].mean()  # it learns
    for name, tolerance in (("bnb", 1e-4), ("fsdp2", 1e-4), ("peft", 1e-3), ("checkpointing", 1e-6), ("offload", 0)):
        theirs = torch.tensor(losses(tmp_path / name))
        torch.testing.assert_close(theirs, ours, rtol=tolerance, atol=0, msg=f"--{name} loss curve differs")
    assert summaries["ours"]["eval_loss_after"] < summaries["ours"]["eval_loss_before"]
    for name in variants:  # every variant wrote a PEFT-format adapter
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()


SLOW_TRAIN = """
import sys, time
sys.path.insert(0, {root!r})
from recipe.train import cli
cli(sys.argv[1:], on_step=lambda record: time.sleep({seconds}))  # slow enough to be killed mid-way
"""


def torchrun(out, model, *flags, step_sleep_s=None):
    """``recipe.train`` on 2 ranks; with ``step_sleep_s``, through a script that sleeps after every step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    entry = ["-m", "recipe.train"]
    if step_sleep_s is not None:
        script = Path(out).parent / "slow_train.py"
        script.write_text(SLOW_TRAIN.format(root=str(ROOT), seconds=step_sleep_s))
        entry = [str(script)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
               *entry, "--model", str(model), "--out", str(out), *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in their own sessions: killpg misses them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


@pytest.mark.slow
def test_sigkill_then_resume_gives_a_bitwise_identical_loss_log(tiny_model, tmp_path):
    flags = ["--steps", "16", "--save-every", "4", "--eval-every", "8", "--dropout", "0.1", *FAST]
    whole = torchrun(tmp_path / "whole", tiny_model, *flags)
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    killed = torchrun(tmp_path / "killed", tiny_model, *flags, step_sleep_s=0.2)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 10):
        assert killed.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    for pid in [killed.pid, *descendants(killed.pid)]:  # the torchrun agent this test started and its ranks
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    resumed_from = int((tmp_path / "killed" / "checkpoints" / "latest").read_text().strip()[len("step-"):])
    assert 4 <= resumed_from < 16

    resumed = torchrun(tmp_path / "killed", tiny_model, *flags, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resumed from step {resumed_from}" in output
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")  # bitwise: floats compared with ==
    evals = [[json.loads(l).get("eval_loss") for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("killed", "whole")]
    assert evals[0] == evals[1]


KILL_DURING_SAVE = """
import os, signal, sys, tempfile, torch, torch.distributed as dist
from recipe import checkpoint
from recipe.twins.sharders import Unsharded
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
model = Unsharded(torch.nn.Linear(3, 1, bias=False)); p = model.model.weight
torch.nn.init.ones_(p); opt = torch.optim.AdamW([p])
p.grad = torch.ones_like(p); opt.step()
checkpoint.save(sys.argv[1], 1, model.local_state(opt), {"sampler": {"epoch": 0, "position": 5, "seed": 0}})
real_replace = os.replace
def die(src, dst):  # killed exactly while the second checkpoint is being committed
    if str(src).endswith("step-000002.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = die
p.data.fill_(7.0); opt.step()
checkpoint.save(sys.argv[1], 2, model.local_state(opt), {"sampler": {"epoch": 0, "position": 9, "seed": 0}})
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    import torch.distributed as dist

    from recipe import checkpoint
    from recipe.twins.sharders import Unsharded

    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], cwd=ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert (tmp_path / "step-000002.tmp").is_dir()          # the half-committed one is there ...
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000001"  # ... but latest still names step 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:  # the group is this test's own: leave none behind for later tests in this process
        model = Unsharded(torch.nn.Linear(3, 1, bias=False))
        p = model.model.weight
        torch.nn.init.zeros_(p)
        opt = torch.optim.AdamW([p])
        state, meta = checkpoint.load(checkpoint.latest(tmp_path), fingerprint={})
        model.load_local_state(opt, state)
    finally:
        dist.destroy_process_group()
    assert meta["step"] == 1 and meta["sampler"]["position"] == 5
    assert torch.all(p < 1.0) and "exp_avg" in opt.state[p]  # one AdamW step from ones, not the 7s


def bpe_checkpoint(directory: Path, vocab_size: int, model_vocab: int) -> Path:
    """A Hugging Face layout made offline: a byte-level BPE ``tokenizer.json`` trained on the pydoc corpus
    (BOS added by its post-processor, as Llama's) beside a random tiny Llama of ``model_vocab`` tokens."""
    tokenizers = reference("tokenizers")
    import llama
    from test_instruct_templates import train_bpe

    tok = train_bpe(vocab_size, ["<s>", "</s>"], documents=1)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    torch.manual_seed(0)
    config = llama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=model_vocab, bos_token_id=0, eos_token_id=1)
    llama.save_checkpoint(llama.Llama(config), directory)
    return directory


def test_a_checkpoint_with_its_own_tokenizer_json_trains_and_a_mismatched_vocab_is_refused(tmp_path):
    """The tokenizer.json of a Hugging Face checkpoint is what --tokenizer auto uses: same ids as
    transformers' fast tokenizer reading that file, and the main job runs on it."""
    transformers = reference("transformers")
    import llama
    from llama.tokenizer import encode_document

    model = bpe_checkpoint(tmp_path / "bpe-llama", vocab_size=400, model_vocab=400)
    tokenizer = llama.load_tokenizer(model)
    text = "The import statement combines two operations; it searches for the named module."
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model / "tokenizer.json"))
    ours = encode_document(tokenizer, text)
    assert ours == [*theirs(text)["input_ids"], 1] and ours[0] == 0 and len(ours) < 0.8 * len(text)  # BOS, merges, EOS
    flags = ["--steps", "12", "--eval-every", "12", *FAST, "--lr", "3e-2"]
    summary = run_on_ranks(_train_one, 1, args=(model, tmp_path / "run", flags))[0]
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05, summary

    small = bpe_checkpoint(tmp_path / "mismatched", vocab_size=400, model_vocab=300)
    with pytest.raises(RuntimeError, match=r"produces token id 3\d\d, but the model's vocab_size is 300"):
        run_on_ranks(_train_one, 1, args=(small, tmp_path / "bad", ["--steps", "1", *FAST]))


def _train_one(rank, world, model, out, flags):
    from recipe.train import main

    return main(["--model", str(model), "--out", str(out), *flags])


def test_the_schedule_warms_up_linearly_then_decays_to_a_tenth_by_cosine():
    from llama.training import warmup_cosine
    from recipe.loop import LoopConfig

    config = LoopConfig(steps=100, lr=1.0)                       # warmup: 5% of the steps
    assert [config.lr_at(s) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert config.lr_at(5 + 95 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert config.lr_at(99) > 0.1 and config.lr_at(100) == pytest.approx(0.1)
    assert LoopConfig(steps=100, lr=2.0, warmup=10).lr_at(30) == warmup_cosine(30, 100, 2.0, 10)
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(0, 10, 1.0, 0)


def test_a_user_error_on_the_command_line_is_one_line_and_status_2(tmp_path):
    command = [sys.executable, "-m", "recipe.train", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "missing" in result.stderr and "Traceback" not in result.stderr
    debug = subprocess.run([*command, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
