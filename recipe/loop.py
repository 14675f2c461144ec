"""The training loop: one optimizer step, the held-out loss, the schedule, the metrics log, checkpoints.

    result = train(run, LoopConfig(steps=300, lr=3e-3, out=Path("runs/default")))

One optimizer step: ``grad_accum`` micro-batches (`Batch`), each rank taking its rows of the global
batch. The loss of the step is token-weighted (``recipe.instruct.loss``): the sum of the per-token losses
over every micro-batch of every rank divided by N, the number of target tokens in the whole global batch.
N is counted before the first micro-batch (one all-reduce per step), so each micro-batch backwards its
sum times world / N at once; the gradient reduction averages over ranks (ours and FSDP2 reduce-scatter
with a mean, the unsharded twin all-reduces and divides), which the factor world undoes. For plain text
every row has the same target count and this is the mean of the micro-batches' means. Then
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
from llama.training import warmup_cosine

from . import checkpoint, profile
from .data import Batch, Sampler
from .device import collective_device, device_peak_mib
from .instruct.loss import global_targets, target_tokens, token_losses
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
    cpu_seconds: float = 0.0        # this process's CPU time (all its threads) over the same steps


def loss_sum(model: TrainableModel, batch: Batch) -> torch.Tensor:
    """The sum of the model's next-token losses over the target tokens of ``batch`` (fp32)."""
    inputs = batch.model_inputs()
    labels = inputs.pop("labels")
    return token_losses(model.forward(**inputs)[0], labels).sum()


@torch.no_grad()
def evaluate(model: TrainableModel, batches: Iterable[Batch], device: torch.device | None = None) -> float:
    """Held-out loss per target token over ``batches`` and all ranks (the sum of token losses over their
    count), in eval mode: no dropout, so no random numbers are drawn and evaluating does not change the run."""
    was_training = model.model.training
    sums = torch.zeros(2, dtype=torch.float64, device=collective_device())  # [loss sum, target count]
    model.model.eval()
    for batch in batches:
        batch = batch if device is None else batch.to(device)
        sums += torch.stack([loss_sum(model, batch).double(), target_tokens(batch.labels).double()]).to(sums.device)
    model.model.train(was_training)
    dist.all_reduce(sums)
    total, count = sums.tolist()  # the one host sync of an evaluation
    if count == 0:
        raise ValueError("the held-out batches hold no target tokens")
    return total / count


def train_step(run: Run, config: LoopConfig, step: int) -> dict:
    """One optimizer step; returns its metrics. "loss" (this rank's token-loss sum times world / N, so that
    `to_numbers`' mean over ranks is the loss per target token of the global batch) and "grad_norm" are
    "targets" (N) are still tensors on the device: a step reads no number (`to_numbers` does)."""
    lr = config.lr_at(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with record_function("data"):  # the labels `recipe.profile` splits a step by
        batches = [run.sampler.next_batch() for _ in range(config.grad_accum)]
        targets, world = global_targets([batch.labels for batch in batches]).to(run.device), dist.get_world_size()
        divisor = targets.clamp(min=1)  # no target at all: zero gradients, no NaN step; `to_numbers` then refuses it
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    for batch in batches:
        with record_function("forward"):
            loss = loss_sum(run.model, batch.to(run.device))
        with record_function("backward"):
            (loss / (divisor / world).to(loss.dtype)).backward()  # divided, as a mean reduction divides
        total += loss.detach()
    with record_function("optimizer"):
        grad_norm = run.model.clip_grad_norm_(config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": total * (world / divisor), "grad_norm": grad_norm, "lr": lr,
            "targets": targets}


def to_numbers(records: list[dict]) -> None:
    """Replace the tensors "loss" (then averaged over ranks), "grad_norm" and "targets" (the same on every
    rank) of ``records`` by Python numbers: one all-reduce and one host sync for all of them, the only place
    the training loop waits for the device. ValueError when a step's global batch held no target token."""
    losses = torch.stack([r["loss"] for r in records]).to(collective_device(), torch.float64)
    dist.all_reduce(losses)
    norms = torch.stack([r["grad_norm"].detach().reshape(()) for r in records]).to(losses.device, torch.float64)
    targets = torch.stack([r["targets"] for r in records]).to(losses.device, torch.float64)
    values = torch.stack([losses / dist.get_world_size(), norms, targets]).tolist()  # the host sync
    for record, loss, norm, count in zip(records, *values):
        if count == 0:
            raise ValueError(f"step {record['step']}: the global batch has no target tokens: every example was "
                             "prompt only or truncated away")
        record["loss"], record["grad_norm"], record["targets"] = loss, norm, int(count)


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
    t0, cpu0, eval_loss, eval_seconds, eval_cpu = time.perf_counter(), time.process_time(), None, 0.0, 0.0
    for step in range(start, config.steps):
        record = train_step(run, config, step)
        profile.step_done()
        pending.append(record)
        last, save = step + 1 == config.steps, (step + 1) % config.save_every == 0 and step + 1 < config.steps
        if (step + 1) % config.eval_every == 0 or last:
            eval_start, eval_cpu_start = time.perf_counter(), time.process_time()
            record["eval_loss"] = eval_loss = evaluate(run.model, run.heldout(), run.device)
            eval_seconds += time.perf_counter() - eval_start
            eval_cpu += time.process_time() - eval_cpu_start
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
    return LoopResult(eval_loss, start, time.perf_counter() - t0 - eval_seconds, time.process_time() - cpu0 - eval_cpu)


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
