"""The main job, from a typed configuration: data -> plan check -> build -> resume -> loop -> adapter.

By default it fine-tunes the bundled tiny-llama on the bundled instruction set (questions about Python's
standard library): held-out loss on the response tokens before and after, and greedy answers to a few
held-out questions before and after (``answer_questions``), then the adapter.

    summary = run_job(JobConfig(build=BuildOptions(...), loop=LoopConfig(...)))

``recipe/train.py`` is its command line; the notebooks and benchmarks may call `run_job` directly.
Runs on every rank of an initialised process group (``recipe.device.init_distributed``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable

import torch
import torch.distributed as dist

import llama

from . import checkpoint, data
from .adapter import load_onto_base, save_trained_adapter
from .build import BuildOptions, Built, build
from .corpus import Corpus, load_corpus, tokenizer_of
from .device import device_peak_mib, memory_budget, release_cached_blocks, reset_device_peak
from .files import write_text_atomically
from .fingerprint import of_job
from .instruct.encode import TextEncoder
from .loop import LoopConfig, LoopResult, Run, StepCallback, evaluate, train, trim_metrics
from .memory import TensorMemory, peak_rss_bytes, reset_peak_rss
from .plan import ALL_LINEAR, GiB, Setup, plan
from .profile import profiling

Log = Callable[[str], None]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


@dataclasses.dataclass
class JobConfig:
    build: BuildOptions
    loop: LoopConfig
    data: str | None = None             # FILE.jsonl, "pydoc", a text file or directory; None: the bundled set
    heldout: str | None = None          # held-out FILE.jsonl; None: the bundled one, or a CRC32 split
    template: str = "auto"              # chat template: the checkpoint's, or alpaca|chatml|llama3|plain
    packing: bool = True                # JSONL: pack examples into seq_len rows (else pad per batch)
    train_on_prompt: bool = False       # JSONL: count the prompt tokens in the loss too
    drop_long: bool = False             # JSONL: drop examples longer than seq_len (else truncate them)
    samples: int | None = None          # held-out questions answered before and after (rank 0 loads the whole
                                        # base for it); None: 4 for the bundled set, 0 for other data
    tokenizer: str = "auto"             # "auto": the checkpoint's; "byte": the byte tokenizer
    seq_len: int = 256
    batch_size: int = 4                 # sequences per rank per micro-batch
    eval_batches: int = 8
    activation_checkpointing: bool = False
    resume: bool = False                # continue from <out>/checkpoints/latest
    memory_gib: float | None = None     # memory per rank for the plan check (default: what the device has)
    track_memory: bool = False          # count live tensor bytes (slower)
    profile: bool = False               # trace a few steps per rank and summarize them (recipe/profile.py)

    def fingerprint(self, model_config: llama.LlamaConfig) -> dict:
        """The settings a checkpoint must share with the run that resumes it (``recipe.fingerprint``)."""
        return of_job(self, model_config)


def check_plan(config: JobConfig, model_config: llama.LlamaConfig, world: int, log: Log) -> None:
    """Warn, with the plan's table, when the planned peak per rank exceeds the memory available."""
    b = config.build
    setup = Setup(world_size=world, gpu_bytes=memory_budget(b.device, config.memory_gib), batch_size=config.batch_size,
                  seq_len=config.seq_len, rank=b.rank,
                  target_modules=tuple(t for t in b.target_modules if t in ALL_LINEAR) or ALL_LINEAR, dora=b.dora,
                  activation_checkpointing=config.activation_checkpointing, offload=b.offload,
                  quantize=b.quant != "none", compute_bytes=b.compute_dtype.itemsize, device=b.device.type)
    result = plan(model_config, setup)
    if not result.fits:
        log(f"WARNING: the planned memory per rank exceeds the {setup.gpu_bytes / GiB:.1f} GiB available; "
            f"lower --batch-size/--seq-len or add --activation-checkpointing/--offload\n{result.table()}")


def enable_activation_checkpointing(layers) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (non-reentrant)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint as recompute

    for layer in layers:
        layer.forward = partial(recompute, layer.forward, use_reentrant=False)


def prepare_run(config: JobConfig, built: Built, corpus: Corpus, model_config: llama.LlamaConfig) -> Run:
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = torch.optim.AdamW(built.parameters, lr=config.loop.lr, weight_decay=0.0)
    sampler = data.Sampler(corpus.train, config.batch_size, rank, world, seed=config.build.seed)
    return Run(built.trainable, optimizer, sampler,
               heldout=lambda: data.eval_batches(corpus.heldout, config.batch_size, config.eval_batches, rank, world),
               device=built.device, rank=rank, tokens_per_step=world * config.batch_size * config.seq_len
               * config.loop.grad_accum, fingerprint={**config.fingerprint(model_config), "data": corpus.fingerprint})


def resume(run: Run, config: JobConfig, log: Log) -> int:
    """The step to start from: 0, or that of ``<out>/checkpoints/latest`` with ``--resume`` (restored)."""
    found = checkpoint.latest(config.loop.out / "checkpoints") if config.resume else None
    if config.resume and found is None:
        log(f"--resume: no checkpoint in {config.loop.out / 'checkpoints'}, starting from step 0")
    if found is None:
        return 0
    state, meta = checkpoint.load(found, run.fingerprint)
    run.model.load_local_state(run.optimizer, state)
    run.sampler.load_state_dict(meta["sampler"])
    log(f"resumed from step {meta['step']}")
    return meta["step"]


def run_job(config: JobConfig, on_step: StepCallback | None = None,
            builder: Callable[[BuildOptions], Built] = build, memory: TensorMemory | None = None) -> dict:
    """Fine-tune as ``config`` says; print and return the summary (held-out loss before/after, tokens/s,
    peaks per rank). ``on_step(record)`` is called after every optimizer step. ``builder`` makes the
    model (``recipe.build.build``; the end-to-end benchmark passes the library stack's). ``memory``
    counts live tensor bytes (default with ``track_memory``: a ``TensorMemory``; ``recipe.measure`` passes
    one that also splits them by phase)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if rank == 0:
        config.loop.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.build.seed + rank)  # dropout masks differ per rank; LoRA init does not use it
    model_config = llama.LlamaConfig.from_hf(config.build.model)
    corpus = load_corpus(config, model_config, world)
    for line in corpus.report:
        log(line)
    answers_before = answer_questions(config, corpus, None)
    check_plan(config, model_config, world, log)
    if memory is None and config.track_memory:
        memory = TensorMemory(record_peak=True)
    with memory or contextlib.nullcontext():  # counting stops even when the run raises
        built = builder(config.build)
        release_cached_blocks(built.device)  # loading's temporaries were shaped unlike a step's tensors
        if config.activation_checkpointing:
            enable_activation_checkpointing(built.model.model.layers)
        run = prepare_run(config, built, corpus, model_config)
        start = resume(run, config, log)
        if rank == 0:
            trim_metrics(config.loop.out / "metrics.jsonl", start)
        log(f"rank 0 of {world}: {built.description}, {dtype_name(config.build.compute_dtype)} on {built.device}; "
            f"load peak RSS {built.load_peak_rss / 2**20:.0f} MiB")
        eval_before = evaluate(run.model, run.heldout(), run.device)
        log(f"held-out loss before: {eval_before:.4f}")
        reset_peak_rss()
        reset_device_peak(built.device)
        if memory:
            memory.reset_peak()
        with profiling(config.loop.out, config.loop.steps - start, config.profile):
            result = train(run, config.loop, start, on_step)
    summary = finish(Finished(config, built, run, eval_before, result, memory, corpus, answers_before), log)
    dist.barrier()
    return summary


@dataclasses.dataclass
class Finished:
    """Everything the end of a run reports on."""
    config: JobConfig
    built: Built
    run: Run
    eval_before: float
    result: LoopResult
    memory: TensorMemory | None
    corpus: Corpus
    answers_before: list[str]


def rank_peaks(done: Finished) -> list[dict]:
    """Every rank's memory peaks, on every rank (collective)."""
    built, memory = done.built, done.memory
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, {"peak_rss_mib": peak_rss_bytes() / 2**20,
                                   "load_peak_rss_mib": built.load_peak_rss / 2**20,
                                   "peak_device_mib": device_peak_mib(built.device),
                                   "load_peak_device_mib": built.load_peak_device_mib,
                                   "peak_tensor_mib": memory.peak / 2**20 if memory else None,
                                   "at_peak_mib": [(round(b / 2**20, 1), op) for b, op in memory.at_peak[:8]]
                                   if memory else None})
    return peaks


def finish(done: Finished, log: Log) -> dict:
    """Write the adapter, gather per-rank peaks, print and write the summary."""
    out, result, device = done.config.loop.out, done.result, done.built.device
    template = done.corpus.template
    save_trained_adapter(done.built, done.config.build, out / "adapter",
                         extra={"chat_template.jinja": template.source} if template is not None else None)
    peaks = rank_peaks(done)
    steps = done.config.loop.steps - result.start
    summary = {"eval_loss_before": done.eval_before, "eval_loss_after": result.eval_loss, "steps": steps,
               "tokens_per_s": done.run.tokens_per_step * steps / result.seconds, "seconds": result.seconds,
               "cpu_ms_per_step": 1000 * result.cpu_seconds / steps, "ranks": peaks}
    log(f"held-out loss: {done.eval_before:.4f} -> {result.eval_loss:.4f}; {summary['tokens_per_s']:.0f} tokens/s over "
        f"{steps} steps ({result.seconds:.1f} s of training, evaluation excluded)")
    for r, p in enumerate(peaks):
        log(f"rank {r}: peak RSS {p['peak_rss_mib']:.0f} MiB training, {p['load_peak_rss_mib']:.0f} MiB loading"
            + (f", peak tensors {p['peak_tensor_mib']:.1f} MiB" if p["peak_tensor_mib"] is not None else "")
            + (f"; peak {device.type} memory allocated {p['peak_device_mib']:.0f} MiB training, "
               f"{p['load_peak_device_mib']:.0f} MiB loading" if p["peak_device_mib"] is not None else ""))
    log(f"adapter written to {out / 'adapter'} (PEFT format)")
    summary["answers"] = show_answers(done, answer_questions(done.config, done.corpus, out / "adapter"), log)
    if dist.get_rank() == 0:
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def answer_questions(config: JobConfig, corpus: Corpus, adapter) -> list[str]:
    """Rank 0's greedy answers to the held-out questions: the unquantized base in fp32, with the trained
    adapter loaded unmerged when ``adapter`` is a directory (``llama.generate``, up to 96 new tokens,
    stopping at EOS). Empty on other ranks and for plain text."""
    if dist.get_rank() != 0 or not corpus.questions:
        return []
    tokenizer = tokenizer_of(config)
    eos = TextEncoder(tokenizer, corpus.template.special_tokens).eos_token_id
    model_dir = config.build.model
    model = (llama.load_checkpoint(None, model_dir) if adapter is None else load_onto_base(model_dir, adapter)).float()
    outputs = llama.generate(model.eval(), [q.prompt_ids for q in corpus.questions], max_new_tokens=96, stop_ids=[eos])
    return [tokenizer.decode([t for t in out if t != eos]).strip() for out in outputs]


def show_answers(done: Finished, after: list[str], log: Log) -> list[dict]:
    """Print each held-out question with the data's answer and the model's before and after training."""
    answers = [{"question": q.text, "reference": q.reference, "before": b, "after": a}
               for q, b, a in zip(done.corpus.questions, done.answers_before, after)]
    if answers:
        log("held-out questions, greedy answers of the base before and of base + adapter after training:")
    for answer in answers:
        log("\n".join(f"  {key:>9}: {answer[key]!r}" for key in ("question", "reference", "before", "after")))
    return answers
