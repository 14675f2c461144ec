"""The training loop: one optimizer step, the held-out loss, the schedule, the metrics log, checkpoints.

    result = train(run, LoopConfig(steps=300, lr=3e-3, out=Path("runs/default")))

One optimizer step: ``grad_accum`` micro-batches (`Batch`), each rank taking its rows of the global
batch; loss / grad_accum backward (under sharding the gradients are reduce-scattered into the shards);
global-norm clipping; AdamW on the local fp32 master shards; the learning rate from linear warmup then
cosine decay (``llama.training.warmup_cosine``). Every ``eval_every`` steps the held-out loss; every
``save_every`` steps an atomic checkpoint (``recipe/checkpoint.py``); one JSON line per step in
``<out>/metrics.jsonl``. The loop sees the model only through ``TrainableModel``: it is the same code for
every combination of twins.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from llama.cli import progress
from llama.training import mean_loss, warmup_cosine

from . import checkpoint, profile
from .data import Batch, Sampler
from .device import all_mean, collective_device, device_peak_mib
from .memory import peak_rss_bytes
from .twins import TrainableModel

StepCallback = Callable[[dict], None]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 300
    lr: float = 3e-3
    warmup: int | None = None       # warmup steps; None: 5% of ``steps`` (at least 1)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10             # metrics become numbers (one host sync) every N steps, and at eval/save/end
    out: Path = Path("runs/default")
    progress: bool = True           # a progress bar on rank 0

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based)."""
        warmup = self.warmup if self.warmup is not None else max(1, self.steps // 20)
        return warmup_cosine(step, self.steps, self.lr, warmup)


@dataclasses.dataclass
class Run:
    """What the loop trains with. ``heldout()`` yields this rank's rows of the fixed held-out batches."""
    model: TrainableModel
    optimizer: torch.optim.Optimizer
    sampler: Sampler
    heldout: Callable[[], Iterable[Batch]]
    device: torch.device
    rank: int
    tokens_per_step: int            # over all ranks
    fingerprint: dict               # the settings a checkpoint must match to be resumed


@dataclasses.dataclass
class LoopResult:
    eval_loss: float                # held-out loss after the last step
    start: int                      # the step the loop started from (0, or the checkpoint's)
    seconds: float                  # training time, evaluation excluded


def batch_loss(model: TrainableModel, batch: Batch) -> torch.Tensor:
    """The model's mean next-token loss on ``batch``."""
    return model.forward(**batch.model_inputs())[1]


def evaluate(model: TrainableModel, batches: Iterable[Batch]) -> float:
    """Mean held-out loss over ``batches``, averaged over ranks (``llama.training.mean_loss``: eval mode,
    no dropout, so no random numbers are drawn and evaluating does not change the run)."""
    return all_mean(mean_loss(model.model, batches, lambda batch: batch_loss(model, batch)))


def train_step(run: Run, config: LoopConfig, step: int) -> dict:
    """One optimizer step; returns its metrics. "loss" (this rank's mean over micro-batches) and "grad_norm"
    are still tensors on the device: the step never waits for the GPU (no ``.item()``, no ``float()``);
    `log_records` turns them into numbers for every step since the last log, with one host sync."""
    lr = config.lr_at(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for _ in range(config.grad_accum):
        with record_function("data"):  # the labels `recipe.profile` splits a step by
            batch = run.sampler.next_batch().to(run.device)
        with record_function("forward"):
            loss = batch_loss(run.model, batch)
        with record_function("backward"):
            (loss / config.grad_accum).backward()
        loss_sum += loss.detach()  # a tensor: ``loss.item()`` here would wait for the GPU every micro-batch
    with record_function("optimizer"):
        grad_norm = run.model.clip_grad_norm_(config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": loss_sum / config.grad_accum, "grad_norm": grad_norm, "lr": lr}


def to_numbers(records: list[dict]) -> None:
    """Replace the tensors "loss" (then averaged over ranks) and "grad_norm" (the same on every rank) of
    ``records`` by Python numbers: one all-reduce and one host sync for all of them, the only place the
    training loop waits for the device."""
    losses = torch.stack([r["loss"] for r in records]).to(collective_device(), torch.float64)
    dist.all_reduce(losses)
    norms = torch.stack([r["grad_norm"].detach().reshape(()) for r in records]).to(losses.device, torch.float64)
    values = torch.stack([losses / dist.get_world_size(), norms]).tolist()  # the host sync
    for record, loss, norm in zip(records, *values):
        record["loss"], record["grad_norm"] = loss, norm


def save_checkpoint(run: Run, config: LoopConfig, step: int) -> Path:
    return checkpoint.save(config.out / "checkpoints", step, run.model.local_state(run.optimizer),
                           {**run.fingerprint, "sampler": run.sampler.state_dict()})


def _progress_bar(run: Run, config: LoopConfig, start: int):
    if run.rank != 0 or not config.progress:
        return None
    return progress(total=config.steps, initial=start, desc="train")  # plain lines when not on a terminal


def _show(bar, record: dict) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        mem=f"{record.get('peak_device_mib', record['peak_rss_mib']):.0f}M")
        bar.update(1)


def log_records(run: Run, config: LoopConfig, records: list[dict], bar, on_step: StepCallback | None) -> None:
    """Make ``records`` numbers (`to_numbers`), append them to ``<out>/metrics.jsonl`` on rank 0, show
    them, and call ``on_step`` on each."""
    to_numbers(records)
    for record in records:
        if run.rank == 0:
            with (config.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        _show(bar, record)
        if on_step is not None:
            on_step(record)


def train(run: Run, config: LoopConfig, start: int = 0, on_step: StepCallback | None = None) -> LoopResult:
    """Steps ``start`` .. ``config.steps`` - 1. ``on_step(record)`` is called after each step's record is
    logged (e.g. to watch or slow down a run), before the checkpoint that follows it.

    Records are logged every ``log_every`` steps, and before an evaluation, a checkpoint and the end, so
    the log of a resumed run still equals an unbroken one. Between two logs nothing waits for the GPU;
    ``tokens_per_s`` of a step between logs is measured when its work was queued, exact at a logged step."""
    bar, pending = _progress_bar(run, config, start), []
    t0, eval_loss, eval_seconds = time.perf_counter(), None, 0.0
    for step in range(start, config.steps):
        record = train_step(run, config, step)
        profile.step_done()
        pending.append(record)
        last, save = step + 1 == config.steps, (step + 1) % config.save_every == 0 and step + 1 < config.steps
        if (step + 1) % config.eval_every == 0 or last:
            eval_start = time.perf_counter()
            record["eval_loss"] = eval_loss = evaluate(run.model, run.heldout())
            eval_seconds += time.perf_counter() - eval_start
        record["tokens_per_s"] = run.tokens_per_step * (step + 1 - start) / (time.perf_counter() - t0 - eval_seconds)
        record["peak_rss_mib"] = peak_rss_bytes() / 2**20
        if run.device.type == "cuda":
            record["peak_device_mib"] = device_peak_mib(run.device)
        if last or save or "eval_loss" in record or (step + 1) % config.log_every == 0:
            log_records(run, config, pending, bar, on_step)
            pending = []
        if save:
            save_checkpoint(run, config, step + 1)
    if bar is not None:
        bar.close()
    return LoopResult(eval_loss, start, time.perf_counter() - t0 - eval_seconds)


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps up to ``last_step`` (the checkpoint resumed from), so a resumed log
    equals an unbroken one; a line torn by a kill ends what is kept."""
    kept = []
    for line in path.read_text().splitlines() if last_step and path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["step"] <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
