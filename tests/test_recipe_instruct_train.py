"""JSONL data through the real training loop (recipe.train -> job -> loop), on a tiny random Llama in fp32.

Token-weighted loss: 4 micro-batches of 1 example take the same step as one batch of 4, and 2 ranks
with different numbers of target tokens the same step as 1 rank with the whole batch (the gradient norm
before clipping, the logged loss and the adapter after the steps, within 1e-6 relative). The three
JSONL formats train on 2 ranks through ``torchrun -m recipe.train`` with each library twin swapped in,
each giving ours' loss curve.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_on_ranks, start_on_ranks
from reference_libs import reference

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the list sorts keys in place and returns None while a heap keeps its smallest item first so "
         "that pop is cheap; a shell lexer splits words by quotes and wraps text to a width").split()
FAST = ["--dtype", "fp32", "--seq-len", "128", "--rank", "4", "--lr", "1e-2", "--eval-batches", "1",
        "--samples", "0", "--no-progress", "--max-grad-norm", "1e9"]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_jsonl(path: Path, fmt: str, n: int = 48, seed: int = 0) -> Path:
    """``n`` examples of ``fmt`` (plain, alpaca, chat) with answers of very different lengths."""
    rng, lines = random.Random(seed), []
    for i in range(n):
        question, answer = sentence(rng, 1, 3), sentence(rng, 1, 9)
        if fmt == "plain":
            record = {"text": f"{question}: {answer}"}
        elif fmt == "alpaca":
            record = {"instruction": question, "input": "" if i % 2 else sentence(rng, 1, 2), "output": answer}
        else:
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(rank, world, model, base_out, variants):
    from recipe.train import main

    return {name: main(["--model", str(model), "--out", str(Path(base_out) / name), *flags])
            for name, flags in variants.items()}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> torch.Tensor:
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def assert_same_step(a: Path, b: Path) -> None:
    for ra, rb in zip(records(a), records(b), strict=True):
        for key in ("grad_norm", "loss", "targets"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=0), (a.name, b.name, key, ra, rb)
    difference = (adapter(a) - adapter(b)).norm() / adapter(b).norm()
    assert difference < 1e-6, (a.name, b.name, difference)


def test_grad_accumulation_and_ranks_take_the_token_weighted_step(tiny_model, tmp_path):
    data, heldout = write_jsonl(tmp_path / "chat.jsonl", "chat"), write_jsonl(tmp_path / "held.jsonl", "chat", 8, 1)
    common = ["--data", str(data), "--heldout", str(heldout), "--no-packing", "--steps", "2", "--eval-every", "2", *FAST]
    one = start_on_ranks(_train, 1, args=(tiny_model, tmp_path, {
        "accum4": ["--grad-accum", "4", "--batch-size", "1", *common], "batch4": ["--batch-size", "4", *common]}), timeout_s=300)
    two = start_on_ranks(_train, 2, args=(tiny_model, tmp_path, {"ranks2": ["--batch-size", "2", *common]}), timeout_s=300)
    one.results(), two.results()
    from recipe.corpus import load_corpus
    from recipe.data import Sampler
    from recipe.instruct.loss import count_targets
    from recipe.train import job_config, parse_args
    import llama

    config = job_config(parse_args(["--model", str(tiny_model), "--batch-size", "2", *common]))
    rows = load_corpus(config, llama.LlamaConfig.from_hf(tiny_model), world=2).train
    per_rank = [count_targets(Sampler(rows, 2, rank, 2).next_batch().labels) for rank in range(2)]
    assert per_rank[0] != per_rank[1], per_rank  # the ranks hold different numbers of target tokens
    targets = [r["targets"] for r in records(tmp_path / "batch4")]
    assert len(set(targets)) == 2, targets  # the two global batches hold different numbers of targets
    assert_same_step(tmp_path / "accum4", tmp_path / "batch4")
    assert_same_step(tmp_path / "ranks2", tmp_path / "batch4")
    evals = [records(tmp_path / name)[-1]["eval_loss"] for name in ("ranks2", "batch4")]
    assert evals[0] == pytest.approx(evals[1], rel=1e-6)


def test_the_bundled_set_is_the_default_and_reports_its_split(tmp_path, capsys):
    from recipe.build import BuildOptions
    from recipe.corpus import load_corpus
    from recipe.job import JobConfig
    from recipe.loop import LoopConfig
    import llama

    model_config = llama.LlamaConfig.from_hf(BuildOptions().model)
    config = JobConfig(build=BuildOptions(), loop=LoopConfig())
    corpus = load_corpus(config, model_config, world=2)
    assert "train.jsonl: 1110 chat examples, template chatml" in corpus.report[0]
    assert "heldout.jsonl: 66 chat examples" in corpus.report[1]
    assert len(corpus.questions) == 4 and corpus.questions[0].text.startswith("What")
    assert corpus.train.batch(torch.arange(2)).attention_mask.shape == (2, 256, 256)

    data = write_jsonl(tmp_path / "alpaca.jsonl", "alpaca", n=200)
    own = JobConfig(build=BuildOptions(), loop=LoopConfig(), data=str(data), seq_len=112, drop_long=True, batch_size=1)
    split = load_corpus(own, model_config, world=1)
    assert "(train part of the CRC32 split)" in split.report[0] and "(heldout part" in split.report[1]
    n_train, n_held = (int(line.split(": ")[2].split()[0]) for line in split.report[:2])
    assert 0 < n_held < n_train and "dropped" in split.report[0]
    padded = load_corpus(JobConfig(build=BuildOptions(), loop=LoopConfig(), data=str(data), seq_len=112,
                                   drop_long=True, packing=False, template="llama3", batch_size=1), model_config, world=1)
    assert padded.fingerprint != split.fingerprint and padded.fingerprint["train"]["template"] == "llama3"
    with pytest.raises(ValueError, match="world size 2000"):
        load_corpus(own, model_config, world=2000)


def test_a_resumed_sampler_state_from_other_data_is_refused():
    from recipe.data import Sampler, windows

    sampler = Sampler(windows(torch.arange(40), 4), batch_size=2)
    state = sampler.state_dict()
    other = Sampler(windows(torch.arange(80), 4), batch_size=2)
    with pytest.raises(ValueError, match="10 rows, this data has 20"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="integers"):
        sampler.load_state_dict({**state, "position": "3"})
    with pytest.raises(ValueError, match="outside"):
        sampler.load_state_dict({**state, "position": 11})


MATRIX = """
import json, sys
sys.path.insert(0, {root!r})
from recipe.train import main
for name, flags in json.loads(sys.argv[1]).items():
    main(["--out", {out!r} + "/" + name, *flags])
"""


@pytest.mark.slow
def test_three_jsonl_formats_train_on_two_ranks_with_every_swap(tiny_model, tmp_path):
    reference("bitsandbytes"), reference("peft")
    swaps = {"ours": [], "bnb": ["--quant", "bnb"], "peft": ["--lora", "peft"], "fsdp2": ["--shard", "fsdp2"]}
    variants = {}
    for fmt in ("plain", "alpaca", "chat"):
        data = write_jsonl(tmp_path / f"{fmt}.jsonl", fmt, n=240)
        for swap, flags in swaps.items():
            variants[f"{fmt}-{swap}"] = ["--model", str(tiny_model), "--data", str(data), "--steps", "3",
                                         "--eval-every", "3", "--batch-size", "2", *FAST, *flags]
    script = tmp_path / "matrix.py"
    script.write_text(MATRIX.format(root=str(ROOT), out=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), json.dumps(variants)]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for fmt in ("plain", "alpaca", "chat"):
        assert f"{fmt}.jsonl (train part of the CRC32 split): " in result.stdout and f" {fmt} examples" in result.stdout
        ours = torch.tensor([r["loss"] for r in records(tmp_path / f"{fmt}-ours")])
        assert len(ours) == 3 and torch.isfinite(ours).all()
        ours_norms = torch.tensor([r["grad_norm"] for r in records(tmp_path / f"{fmt}-ours")])
        for swap, tolerance in (("bnb", 1e-4), ("fsdp2", 1e-4), ("peft", 1e-3)):
            theirs = torch.tensor([r["loss"] for r in records(tmp_path / f"{fmt}-{swap}")])
            torch.testing.assert_close(theirs, ours, rtol=tolerance, atol=0, msg=f"{fmt} --{swap} differs")
            # the gradient's scale too (AdamW's step hides it): FSDP2 averages over ranks, as ours does
            norms = torch.tensor([r["grad_norm"] for r in records(tmp_path / f"{fmt}-{swap}")])
            torch.testing.assert_close(norms, ours_norms, rtol=10 * tolerance, atol=0, msg=f"{fmt} --{swap} grad norm")
            assert (tmp_path / f"{fmt}-{swap}" / "adapter" / "adapter_model.safetensors").is_file()
    assert "targets: every token" in result.stdout and "targets: the responses only" in result.stdout


def test_the_library_stack_reads_packed_rows_as_ours_does(tiny_model, tmp_path):
    """benchmarks.e2e_library hands transformers the packed rows' mask and positions: same logits as ours."""
    transformers = reference("transformers")
    import llama
    from benchmarks.e2e_library import hf_inputs
    from recipe.instruct.batching import ExampleRows
    from recipe.instruct.dataset import load_instruct

    data = load_instruct(write_jsonl(tmp_path / "chat.jsonl", "chat", n=12), llama.ByteTokenizer(), None, "chatml", 128)
    batch = ExampleRows(data.examples, 128, packing=True).batch(torch.arange(2))
    assert batch.position_ids[0].eq(0).sum() > 1  # several examples in a row
    ours = llama.load_checkpoint(None, tiny_model).float().eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    inputs = {"position_ids": batch.position_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        expected = ours(batch.input_ids, **inputs)
        got = theirs(input_ids=batch.input_ids, **hf_inputs(inputs)).logits
    # every position, the padding at the end of a row included (a padding token attends only to itself)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_resume_refuses_another_template_or_packing(tiny_model, tmp_path):
    data, heldout = write_jsonl(tmp_path / "chat.jsonl", "chat"), write_jsonl(tmp_path / "held.jsonl", "chat", 8, 1)
    flags = ["--data", str(data), "--heldout", str(heldout), "--steps", "2", "--save-every", "1", "--eval-every", "2",
             "--batch-size", "2", *FAST]
    run_on_ranks(_train, 1, args=(tiny_model, tmp_path, {"run": flags}), timeout_s=300)
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    for changed in (["--template", "llama3"], ["--no-packing"], ["--train-on-prompt"]):
        with pytest.raises(RuntimeError, match=r"was written with other settings: data\."):
            run_on_ranks(_train, 1, args=(tiny_model, tmp_path, {"run": [*flags, "--resume", *changed]}), timeout_s=300)


def test_chat_prompts_use_the_template_saved_with_the_adapter(tmp_path):
    import llama
    from recipe.build import DEFAULT_MODEL
    from recipe.instruct import BUILTIN
    from recipe.instruct.corpus import chat_prompt, held_out_questions, load_splits

    tokenizer = llama.ByteTokenizer()
    data = write_jsonl(tmp_path / "chat.jsonl", "chat", n=40)
    _, held = load_splits(data, tokenizer, DEFAULT_MODEL, "llama3", 256)
    question = held_out_questions(held, tokenizer, 1)[0]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "chat_template.jinja").write_text(BUILTIN["llama3"])
    assert chat_prompt(DEFAULT_MODEL, tmp_path / "adapter", tokenizer, question.text) == question.prompt_ids
    assert tokenizer.decode(question.prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    plain = tokenizer.decode(chat_prompt(DEFAULT_MODEL, None, tokenizer, "Hi"))  # the bundled model has none: chatml
    assert plain == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_held_out_question_is_the_user_turn_before_the_first_answer(tmp_path):
    import llama
    from recipe.instruct.corpus import held_out_questions
    from recipe.instruct.dataset import load_instruct

    turns = [[("system", "Be brief."), ("user", "Why?"), ("assistant", "Because.")],
             [("system", "Be brief."), ("assistant", "Hello."), ("user", "Why?"), ("assistant", "Because.")]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in t]}) + "\n" for t in turns))
    data = load_instruct(path, llama.ByteTokenizer(), None, "chatml", 256)
    questions = held_out_questions(data, llama.ByteTokenizer(), 2)
    assert [(q.text, q.reference) for q in questions] == [("Why?", "Because."), ("", "Hello.")]


def test_generate_chat_sends_the_rendered_conversation():
    import llama
    from recipe.build import DEFAULT_MODEL
    from recipe.generate import main
    from recipe.instruct.corpus import chat_prompt

    report = main(["--model", str(DEFAULT_MODEL), "--chat", "--prompt", "What is heapq for?", "--max-new-tokens", "2"])
    assert report["prompt_tokens"] == len(chat_prompt(DEFAULT_MODEL, None, llama.ByteTokenizer(), "What is heapq for?"))


def test_a_restored_sampler_draws_the_same_packed_batches(tmp_path):
    import llama
    from recipe.data import Sampler
    from recipe.instruct.batching import ExampleRows
    from recipe.instruct.dataset import load_instruct

    data = load_instruct(write_jsonl(tmp_path / "chat.jsonl", "chat", n=60), llama.ByteTokenizer(), None, "chatml", 128)
    for packing in (True, False):
        rows = ExampleRows(data.examples, 128, packing)
        sampler = Sampler(rows, batch_size=2, rank=1, world_size=2, seed=5)
        for _ in range(7):  # past the end of the first epoch
            sampler.next_batch()
        state, expected = sampler.state_dict(), [sampler.next_batch() for _ in range(4)]
        resumed = Sampler(rows, batch_size=2, rank=1, world_size=2, seed=5)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint's JSON stores it
        for want in expected:
            got = resumed.next_batch()
            for field in ("input_ids", "labels", "position_ids", "attention_mask"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (packing, field)
