"""End to end, 2 ranks: our QLoRA + FSDP recipe vs the library stack, same model, data and hyper-parameters.

    python -m benchmarks.e2e [--steps 60 --seq-len 256 --batch-size 4 --repeats 3]
    python -m benchmarks.e2e --quick                     # tiny sizes, seconds: checks that both sides run
    python -m benchmarks.e2e --profile                   # and where a step's time goes on each side
    python -m benchmarks.e2e --device cuda --ranks 1     # on one GPU (benchmarks/gpu.sh); NCCL needs a GPU per rank

(a) ours     ``torchrun -m recipe.train``: nf4.Linear4bit + lora.LoRALinear + sharding.shard_model
(b) library  ``torchrun -m benchmarks.e2e_library``: transformers ``LlamaForCausalLM`` loaded 4-bit by
             bitsandbytes, PEFT ``get_peft_model``, PyTorch FSDP2 ``fully_shard``
Both run the recipe's job (``recipe.job.run_job``) on the bundled tiny-llama and the main job's data:
by default ``recipe.train``'s (the bundled instruction set, chat template, the responses as targets,
examples packed into ``--seq-len`` rows; ``--data``, ``--heldout``, ``--template``, ``--packing`` are
passed to both sides). Each side runs in its own ``torchrun``, so the memory numbers do not mix;
``--repeats N`` runs each side N times, alternating which goes first, and reports the medians.

What is the same on both sides, so that only the model stack differs:
- tokens: the same sampler (same rows, same order), the same held-out batches;
- packing: both pack; each packed row's block-diagonal causal mask (bool, batch x q x kv) and per-example
  positions go to both models (transformers takes it as a 4-D mask), and both run PyTorch's SDPA on it;
- precision: NF4 with double quantization (block 64) dequantized to the compute dtype, LoRA computed in the
  compute dtype, fp32 master weights and AdamW state, gradients reduced in fp32, the loss in fp32;
- no activation checkpointing on either side; the same LoRA initialisation (``reset_lora_init``),
  AdamW, warmup + cosine schedule, clipping at 1.0, and evaluation;
- host syncs: the loop's (one per logged step, one per evaluation) on both; neither model reads a
  number back per step on a GPU (ours checks the token ids' range on CPU only);
- environment: 1 OpenMP thread per rank; glibc told to return freed blocks over 64 KiB to the OS
  (``MALLOC_MMAP_THRESHOLD_``) so that RSS tracks live memory -- which also makes every allocation over
  64 KiB a fresh, page-faulted mapping on both sides.
Per rank: tokens/s of the training steps, the process CPU time per step (rank 0; all threads; other jobs
on the machine move it much less than wall time), peak RSS while training and while loading, on a GPU
also the peak of ``torch.cuda.max_memory_allocated``, and the held-out loss before and after; ratios
ours / library. Targets: >= 1.10x tokens/s at the same loss and <= 1.0x memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llama.cli import Parser, fail, integer, number, run_command

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"steps": 2, "seq_len": 256, "batch_size": 2, "eval_batches": 1}


def torchrun(ranks: int, module: str, flags: list[str]) -> None:
    """``python -m <module> flags`` on ``ranks`` processes, from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), "-m", module, *flags], cwd=ROOT, env=env)
    if done.returncode:
        fail(f"{module} failed with exit status {done.returncode} (its output is above)")


def parse_args(argv=None) -> argparse.Namespace:
    from recipe.build import DEFAULT_MODEL

    p = Parser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=None, help="as recipe.train's --data (default: the main job's, the bundled "
                   "instruction set)")
    p.add_argument("--heldout", default=None, help="as recipe.train's --heldout")
    p.add_argument("--template", default="auto", help="as recipe.train's --template")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True, help="as recipe.train's")
    p.add_argument("--steps", type=integer(minimum=1), default=60)
    p.add_argument("--seq-len", type=integer(minimum=2), default=256, help="as recipe.train's (default: its default)")
    p.add_argument("--batch-size", type=integer(minimum=1), default=4)
    p.add_argument("--rank", type=integer(minimum=1), default=8)
    p.add_argument("--alpha", type=number(above=0), default=16.0)
    p.add_argument("--lr", type=number(above=0), default=3e-3)
    p.add_argument("--eval-batches", type=integer(minimum=1), default=8)
    p.add_argument("--seed", type=integer(minimum=0), default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: recipe.train's default")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as recipe.train's --device")
    p.add_argument("--ranks", type=integer(minimum=1), default=2, help="processes (on CUDA: at most one per GPU)")
    p.add_argument("--repeats", type=integer(minimum=1), default=1, help="runs per side, alternating which "
                   "side goes first; tokens/s and CPU time are the medians")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="both sides run with recipe.train's --profile; "
                   "prints where a step's time goes, side by side")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes, seconds ({QUICK}): checks both sides run")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def combined(runs: list[dict]) -> dict:
    """One side's repeats as one summary: the median tokens/s and CPU time per step, the highest memory
    peaks, the losses of the first run (every run trains the same steps on the same data)."""
    if len(runs) == 1:
        return runs[0]
    side = {**runs[0], "ranks": [{key: max(run["ranks"][r][key] for run in runs) if isinstance(value, (int, float))
                                       else value for key, value in rank.items()} for r, rank in enumerate(runs[0]["ranks"])]}
    for key in ("tokens_per_s", "cpu_ms_per_step"):
        side[key] = statistics.median(run[key] for run in runs)
    return side


def table(args, device: str, ours_runs: list[dict], lib_runs: list[dict]) -> str:
    ours, lib = combined(ours_runs), combined(lib_runs)
    median = " (median)" if args.repeats > 1 else ""
    rows = [(f"tokens/s ({args.ranks} ranks){median}", "tokens_per_s", None, "{:.0f}"),
            (f"CPU ms per step, rank 0{median}", "cpu_ms_per_step", None, "{:.0f}")]
    for r in range(args.ranks):
        rows += [(f"peak RSS training, rank {r} (MiB)", "peak_rss_mib", r, "{:.0f}"),
                 (f"peak RSS loading, rank {r} (MiB)", "load_peak_rss_mib", r, "{:.0f}")]
        if device == "cuda":
            rows += [(f"peak GPU allocated training, rank {r} (MiB)", "peak_device_mib", r, "{:.0f}"),
                     (f"peak GPU allocated loading, rank {r} (MiB)", "load_peak_device_mib", r, "{:.0f}")]
    rows += [("held-out loss before", "eval_loss_before", None, "{:.4f}"),
             (f"held-out loss after {args.steps} steps", "eval_loss_after", None, "{:.4f}")]
    lines = [f"end to end, {args.ranks} ranks on {device}, batch {args.batch_size} x seq {args.seq_len} per rank, "
             f"r={args.rank}, {args.steps} steps, {args.dtype} compute, {args.repeats} run(s) per side interleaved",
             f"| {'':<42} | {'ours':>10} | {'library':>10} | {'ours/lib':>8} |",
             f"|{'-' * 44}|{'-' * 12}|{'-' * 12}|{'-' * 10}|"]
    for name, key, r, fmt in rows:
        a, b = (side[key] if r is None else side["ranks"][r][key] for side in (ours, lib))
        lines.append(f"| {name:<42} | {fmt.format(a):>10} | {fmt.format(b):>10} | {a / b:>7.3f}x |")
    if args.repeats > 1:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours_runs, lib_runs)]
        lines.append("tokens/s ours/library per repeat: " + ", ".join(f"{r:.3f}x" for r in ratios))
    return "\n".join(lines)


def profile_table(out: Path) -> str:
    """Rank 0's mean profiled step of each side, split as ``recipe.profile`` does (ms)."""
    from recipe.profile import PARTS

    ours, lib = (json.loads((out / name / "profile" / "summary.json").read_text())["ranks"][0]
                 for name in ("ours", "library"))
    lines = [f"where a step's time goes, rank 0 (ms; traces in {out}/<side>/profile)",
             f"| {'part':<16} | {'ours':>10} | {'library':>10} |", f"|{'-' * 18}|{'-' * 12}|{'-' * 12}|"]
    for name, a, b in [*((n, ours["parts_ms"][n], lib["parts_ms"][n]) for n in PARTS),
                       ("idle: in flight", ours["in_flight_ms"], lib["in_flight_ms"]),
                       ("step", ours["step_ms"], lib["step_ms"]),
                       ("CPU time, step", ours["cpu_ms_per_step"], lib["cpu_ms_per_step"])]:
        lines.append(f"| {name:<16} | {a:>10.1f} | {b:>10.1f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    import torch

    from recipe.device import default_dtype, resolve_device

    args = parse_args(argv)
    device = resolve_device(args.device, per_node=args.ranks)  # the device each of the ranks will take
    if device.type == "cuda" and args.ranks > torch.cuda.device_count():
        fail(f"--ranks {args.ranks} on CUDA needs a GPU per rank; {torch.cuda.device_count()} visible")
    args.dtype = args.dtype or default_dtype(device)
    shared = ["--model", args.model, "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size",
              str(args.batch_size), "--rank", str(args.rank), "--alpha", str(args.alpha), "--lr", str(args.lr),
              "--eval-batches", str(args.eval_batches), "--seed", str(args.seed), "--dtype", args.dtype,
              "--device", device.type, "--eval-every", str(args.steps), "--save-every", str(args.steps),
              "--no-progress", "--samples", "0", *(["--data", args.data] if args.data else []), "--template", args.template,
              "--packing" if args.packing else "--no-packing", *(["--heldout", args.heldout] if args.heldout else []),
              *(["--profile"] if args.profile else [])]
    out = Path(args.out or tempfile.mkdtemp(prefix="home70b-e2e-"))
    runs = {"ours": [], "library": []}
    for i in range(args.repeats):  # ours first, then library first, ...: a drift in the machine's load cancels
        sides = [("ours", "recipe.train"), ("library", "benchmarks.e2e_library")][::(-1) ** i]
        for name, module in sides:
            folder = out / (name if i == 0 else f"{name}-{i + 1}")
            torchrun(args.ranks, module, [*shared, "--out", str(folder)])
            runs[name].append(json.loads((folder / "summary.json").read_text()))
    text = table(args, device.type, runs["ours"], runs["library"])
    if args.profile:
        text += "\n\n" + profile_table(out)
    print("\n" + text)
    return text


if __name__ == "__main__":
    run_command(main)
