"""The step-time model against measured steps on this machine: predicted vs measured s/step, side by side.

    python -m recipe.timecheck                  # the main job's defaults (bundled tiny-llama), 1 and 2 ranks
    python -m recipe.timecheck --quick          # seconds: 1 rank, short plain-text rows, a few steps

For each rank count the main job (``recipe.train``, its defaults) runs on that many CPU ranks, started as
``torchrun`` starts them (one process per rank, the cores shared out as torch threads), and each time
the loop logs (every ``LoopConfig.log_every`` = 10 steps) each rank pauses to run
``recipe.microbench.measure_rates`` at the step's shapes: the rates and the steps are measured by the
same processes, interleaved in one window, under the same load. The model
(``recipe.timemodel.step_seconds``) predicts from the median of those rates, twice:

    wall  rates timed by the wall clock, against the steady-state step: the median wall time of the
          steps after the first ``--skip`` (which allocate workspaces and optimizer state), from the
          loop's own records (the cumulative ``tokens_per_s`` of each step gives its end; the held-out
          evaluation is excluded; the step after a pause for the micro-benchmark includes it, which the
          median leaves out)
    cpu   rates timed by the process's CPU time, against the CPU seconds per step between the first and
          the last pause (the micro-benchmark's own CPU time taken out; the last window holds one
          held-out batch's forward): what the step costs whatever share of the cores other work leaves it

On a machine shared with other work the wall clock moves with its load; the CPU clock much less.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from llama.cli import Parser, integer, run_command

from .loop import LoopConfig
from .timemodel import Machine, step_seconds, workload_of


def steady_step_seconds(records: list[dict], tokens_per_step: int, skip: int) -> float:
    """Median seconds of the steps after the first ``skip``, from the loop's records of one run."""
    ends = [tokens_per_step * r["step"] / r["tokens_per_s"] for r in records]
    durations = [b - a for a, b in zip(ends, ends[1:])][max(0, skip - 1):]
    if not durations:
        raise ValueError(f"need more than skip={skip} steps, got {len(records)}")
    return statistics.median(durations)


def _rank(rank: int, world: int, port: int, argv: list[str], every: int, repeats: int, workload, queue) -> None:
    """One rank: torchrun's environment, the job, and at every ``every``-th step's record the micro-benchmark
    twice (wall clock, then this process's CPU time) and a CPU-time mark that leaves out its own cost."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from .device import close_distributed
    from .microbench import measure_rates
    from .train import job_config, parse_args, run

    args = parse_args(argv)
    dtype, records, found = job_config(args).build.compute_dtype, [], {"wall": [], "cpu": [], "marks": []}
    benched = 0.0  # CPU seconds spent in the micro-benchmark so far

    def on_step(record: dict) -> None:  # called for each record when the loop logs (every log_every steps)
        nonlocal benched
        records.append(record)
        if record["step"] % every == 0:
            start = time.process_time()
            found["marks"].append((record["step"], start - benched))
            found["wall"].append(measure_rates(dtype, workload, repeats))
            found["cpu"].append(measure_rates(dtype, workload, repeats, time.process_time))
            benched += time.process_time() - start
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run(args, on_step)
        everyone = [None] * world
        dist.all_gather_object(everyone, found)
        if rank == 0:
            queue.put((records, everyone))
    finally:
        close_distributed()


def cpu_step_seconds(marks: list[tuple[int, float]]) -> float:
    """CPU seconds per step between the first and the last mark (step, CPU seconds of the process)."""
    (first, start), (last, end) = marks[0], marks[-1]
    if last <= first:
        raise ValueError(f"need two CPU-time marks at different steps, got {marks}")
    return (end - start) / (last - first)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(ranks: int, flags: dict, every: int, skip: int, repeats: int, masked: bool) -> dict:
    """Run the job on ``ranks`` ranks with the interleaved micro-benchmark; the prediction and the measurement."""
    from llama.pretrain import BUNDLED_MODEL

    from .plan import Setup

    setup = Setup(world_size=ranks, batch_size=flags["batch-size"], seq_len=flags["seq-len"], rank=8,
                  activation_checkpointing=False, device="cpu")
    workload = workload_of(BUNDLED_MODEL, setup, masked)
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="home70b-timecheck-") as out:
        argv = [word for k, v in flags.items() for word in (f"--{k}", str(v))]
        argv += ["--device", "cpu", "--no-progress", "--samples", "0", "--out", out]
        mp.spawn(_rank, args=(ranks, _free_port(), argv, every, repeats, workload, queue), nprocs=ranks)
        records, everyone = queue.get()
    tokens = ranks * flags["batch-size"] * flags["seq-len"]
    row = {"ranks": ranks, "measured": {"wall": steady_step_seconds(records, tokens, skip),
                                        "cpu": statistics.median(cpu_step_seconds(r["marks"]) for r in everyone)}}
    for clock in ("wall", "cpu"):
        rates = [r for found in everyone for r in found[clock]]
        row[clock] = Machine(name=f"this CPU ({ranks} ranks, {clock} clock)", host_link_bytes_per_s=None,
                             source=f"recipe.microbench, median of {len(rates)} runs interleaved with the steps",
                             **{k: statistics.median(r[k] for r in rates) for k in rates[0]})
        row[f"predicted {clock}"] = step_seconds(BUNDLED_MODEL, setup, row[clock], masked)
    return row


def table(rows: list[dict]) -> str:
    """Predicted vs measured s/step per rank count, in wall time and in CPU time, the ratios, the parts."""
    lines = [f"{'ranks':>5}{'clock':>6}{'predicted s/step':>18}{'measured s/step':>17}{'ratio':>7}   predicted parts (s)",
             "-" * 110]
    for r in rows:
        for clock in ("wall", "cpu"):
            p, measured = r[f"predicted {clock}"], r["measured"][clock]
            parts = ", ".join(f"{k} {v:.3f}" for k, v in p.items() if k != "step" and v >= 5e-4)
            lines.append(f"{r['ranks']:>5}{clock:>6}{p['step']:>18.3f}{measured:>17.3f}{p['step'] / measured:>7.2f}   {parts}")
    return "\n".join(lines) + ("\n(per rank; wall: steady-state median step; cpu: this process's CPU seconds per step, "
                               "all its threads; measured while the machine was shared)")


def rank_counts(text: str) -> list[int]:
    """``--ranks``: comma-separated rank counts, each an integer >= 1."""
    counts = [word.strip() for word in text.split(",")]
    if not all(word.isdigit() and int(word) >= 1 for word in counts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return [int(word) for word in counts]


def parse_args(argv=None):
    p = Parser(prog="python -m recipe.timecheck", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=rank_counts, default=[1, 2], help="comma-separated rank counts (default: 1,2)")
    p.add_argument("--steps", type=integer(minimum=2 * LoopConfig.log_every), default=30)
    p.add_argument("--skip", type=integer(minimum=1), default=5, help="first steps left out of the steady state")
    p.add_argument("--repeats", type=integer(minimum=1), default=3, help="micro-benchmark repeats (medians)")
    p.add_argument("--quick", action="store_true", help="1 rank, plain-text rows of 64 tokens, 20 steps")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    from .microbench import describe

    args = parse_args(argv)
    if args.quick:
        ranks, every, skip, repeats, masked = [1], LoopConfig.log_every, 5, 1, False
        flags = {"data": "pydoc", "batch-size": 1, "seq-len": 64, "steps": 2 * LoopConfig.log_every}
    else:   # the main job's defaults: packed instruction rows (an explicit attention mask)
        ranks, every, skip, repeats = args.ranks, LoopConfig.log_every, args.skip, args.repeats
        masked = True
        flags = {"batch-size": 4, "seq-len": 256, "steps": args.steps}
    rows = []
    for count in ranks:
        rows.append(check(count, {**flags, "eval-batches": 1}, every, skip, repeats, masked))
        print(describe(rows[-1]["wall"]), "\n" + describe(rows[-1]["cpu"]), flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    run_command(main)
