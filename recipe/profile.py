"""``--profile``: a Chrome trace of a few training steps per rank, and where a step's time goes.

    with profiling(out, steps=config.loop.steps, enabled=True):
        train(...)            # the loop calls `step_done()` after every optimizer step

The loop labels each step's phases with ``torch.profiler.record_function`` ("data", "forward",
"backward", "optimizer"). After one step skipped and one of warm-up (steps 2-4, 0-based, on a long
enough run), ``torch.profiler`` records up to three steps and writes ``<out>/profile/rank<r>.json``, the
Chrome trace format (open it in https://ui.perfetto.dev or chrome://tracing). `summarize` reads that
trace back and splits the mean recorded step, on the thread that ran it, into

    compute    operators running inside the forward and backward labels, less the collectives
    gather     all-gathers (``_allgather_base`` ...) called on the step's thread
    reduce     reduce-scatters and all-reduces (gradients, the clipping norm) called on it
    optimizer  the optimizer label (clipping, AdamW, zero_grad), less its collectives
    data       the data label (next batch, copy to the device)
    idle       the rest: Python between operators (hooks, the loop), waiting on collectives

so the parts add up to the step time by construction. A collective that runs on another thread (gloo's
async all-gather, overlapped with compute) costs the step only where the step's thread waits for it:
"in flight" is the idle time inside forward and backward while one ran elsewhere. Rank 0 prints one
table (a column per rank) and writes it as ``<out>/profile/summary.json``, with "CPU time": the median
process CPU time (all threads) of the steps not recorded, a measure other jobs on the machine barely move.
"""
from __future__ import annotations

import contextlib
import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, schedule

from .files import write_atomically, write_text_atomically

LABELS = ("data", "forward", "backward", "optimizer")
PARTS = ("compute", "gather", "reduce", "optimizer", "data", "idle")
GATHER = re.compile(r"all_?gather|allgather", re.IGNORECASE)
REDUCE = re.compile(r"reduce_?scatter|all_?reduce|allreduce", re.IGNORECASE)
_cpu_stamps: list[list[float]] = []  # this process's CPU time at the start and after every step, while profiling
_active: list[profile] = []


def step_done() -> None:
    """Tell the running profiler (if any) that an optimizer step ended; free when not profiling."""
    for stamps in _cpu_stamps:
        stamps.append(time.process_time())
    for profiler in _active:
        profiler.step()


def _window(steps: int) -> tuple[int, int, int]:
    """(skipped, first recorded, end): skip step 0 and warm up on step 1 when the run is long enough,
    then record up to three steps."""
    skip = 1 if steps >= 3 else 0
    first = skip + (1 if steps - skip >= 2 else 0)
    return skip, first, first + max(1, min(3, steps - first))


def _schedule(steps: int):
    skip, first, end = _window(steps)
    return schedule(skip_first=skip, wait=0, warmup=first - skip, active=end - first, repeat=1)


def cpu_ms_per_step(stamps: list[float], steps: int) -> float:
    """Median CPU time of this process (every thread) per step, from ``stamps``, leaving out the recorded
    steps (the profiler's own work) when others remain. CPU time, unlike wall time, hardly changes when
    other jobs share the machine."""
    deltas = [b - a for a, b in zip(stamps, stamps[1:])]
    _, first, end = _window(steps)
    unrecorded = deltas[:first] + deltas[end:]
    return 1000 * statistics.median(unrecorded or deltas) if deltas else 0.0


@contextlib.contextmanager
def profiling(out: Path, steps: int, enabled: bool = True):
    """Profile the ``steps`` training steps run inside (see the module docstring); a no-op when not
    ``enabled`` or when no step is left to run (a run resumed at its end)."""
    if not enabled or steps < 1:
        yield
        return
    rank, folder = dist.get_rank(), Path(out) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / f"rank{rank}.json"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def write(profiler: profile) -> None:  # atomic: a reader never sees half a trace
        write_atomically(trace, profiler.export_chrome_trace)

    profiler, stamps = profile(activities=activities, schedule=_schedule(steps), on_trace_ready=write), []
    stamps.append(time.process_time())
    with profiler:
        _active.append(profiler)
        _cpu_stamps.append(stamps)
        try:
            yield
        finally:
            _active.remove(profiler)
            _cpu_stamps.remove(stamps)
    summary = summarize(trace) if trace.exists() else None
    if summary is not None:
        summary["cpu_ms_per_step"] = cpu_ms_per_step(stamps, steps)
    report(folder, summary)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals, window: tuple[float, float]) -> float:
    """Total time of the (disjoint) ``intervals`` inside ``window``."""
    return sum(max(0.0, min(end, window[1]) - max(start, window[0])) for start, end in intervals)


def _spans(events: list[dict], keep) -> list[tuple[float, float]]:
    return _union([(e["ts"], e["ts"] + e["dur"]) for e in events if keep(e)])


def _step_parts(step: dict, events: list[dict]) -> dict:
    """One recorded step split into `PARTS` (microseconds), plus "in_flight" (see `summarize`)."""
    window = (step["ts"], step["ts"] + step["dur"])
    inside = [e for e in events if e["pid"] == step["pid"] and e["ts"] < window[1] and e["ts"] + e["dur"] > window[0]]
    mine, others = [e for e in inside if e["tid"] == step["tid"]], [e for e in inside if e["tid"] != step["tid"]]
    gather = _spans(mine, lambda e: GATHER.search(e["name"]))
    reduce = _subtract(_spans(mine, lambda e: REDUCE.search(e["name"])), gather)
    collectives = _union(gather + reduce)
    ops = _spans(mine, lambda e: e.get("cat") == "cpu_op")
    model = _spans(mine, lambda e: e["name"] in ("forward", "backward"))
    label = {name: _spans(mine, lambda e: e["name"] == name) for name in ("data", "optimizer")}
    part = {"compute": sum(_length(ops, span) - _length(collectives, span) for span in model),
            "gather": _length(gather, window), "reduce": _length(reduce, window),
            "optimizer": sum(_length(label["optimizer"], window) - _length(collectives, s) for s in label["optimizer"]),
            "data": _length(label["data"], window)}
    part["idle"] = max(0.0, step["dur"] - sum(part.values()))
    elsewhere = _spans(others, lambda e: GATHER.search(e["name"]) or REDUCE.search(e["name"]))
    part["in_flight"] = sum(_length(elsewhere, gap) for gap in _subtract(model, ops))
    return part


def summarize(trace: Path) -> dict:
    """The mean recorded step of a Chrome trace, split into `PARTS` (milliseconds; they sum to "step_ms").
    "idle" is the step less the other parts: Python between operators (hooks, the loop), and waiting on a
    collective that runs on another thread; "in_flight_ms" is the part of it, inside forward and backward,
    spent with no operator running on the step's thread while a collective ran on another."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    if not steps:
        raise ValueError(f"trace {trace}: no ProfilerStep events; profile at least one whole step")
    parts = [_step_parts(step, events) for step in steps]
    mean = {name: sum(p[name] for p in parts) / len(parts) / 1000 for name in (*PARTS, "in_flight")}
    in_flight = mean.pop("in_flight")
    return {"steps": len(steps), "step_ms": sum(mean.values()), "parts_ms": mean, "in_flight_ms": in_flight}


def _subtract(intervals, removed):
    """``intervals`` less the time they share with ``removed`` (both disjoint and sorted)."""
    kept = []
    for start, end in intervals:
        for cut_start, cut_end in removed:
            if cut_end <= start or cut_start >= end:
                continue
            if cut_start > start:
                kept.append((start, cut_start))
            start = max(start, cut_end)
        if start < end:
            kept.append((start, end))
    return kept


def format_table(summaries: list[dict | None]) -> str:
    """One screen: a row per part, a column per rank (ms per step and its share)."""
    head = "part        " + "".join(f"{'rank ' + str(r):>20}" for r in range(len(summaries)))
    rows = [head]
    special = {"step": "step_ms", " in flight": "in_flight_ms", "CPU time": "cpu_ms_per_step"}
    for name in (*PARTS, " in flight", "step", "CPU time"):
        cells = []
        for s in summaries:
            if s is None:
                cells.append(f"{'-':>20}")
                continue
            ms = s[special[name]] if name in special else s["parts_ms"][name]
            share = f"{100 * ms / s['step_ms']:>4.0f}%" if name != "CPU time" else ""  # CPU time is no part of the step
            cells.append(f"{ms:>11.1f} ms {share:>5}")
        rows.append(f"{name:<12}" + "".join(cells))
    return "\n".join(rows)


def report(folder: Path, summary: dict | None) -> None:
    """Gather every rank's summary; rank 0 prints the table and writes ``summary.json`` (collective)."""
    summaries: list = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    if dist.get_rank() != 0:
        return
    print(f"profile: mean of the recorded steps per rank; traces in {folder}\n{format_table(summaries)}", flush=True)
    write_text_atomically(folder / "summary.json", json.dumps({"ranks": summaries}, indent=1) + "\n")
