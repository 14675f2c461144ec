"""Check the planner against a real run: planned vs measured peak per phase and per component, per rank.

    python -m recipe.measure                                    # the bundled tiny-llama, 2 ranks
    python -m recipe.measure --preset llama-2-7b --layers 1 --seq-len 2048 --batch-size 1 --dtype bf16 \
        [--activation-checkpointing]                            # 7B width, where activations dominate

For a preset, a checkpoint with the preset's exact widths (e.g. hidden 4096, intermediate 11008, 32
heads, vocab 32000 for Llama-2-7B) but only ``--layers`` decoder layers and random bf16 weights is
written to a temporary directory; then ``recipe.train`` runs a few steps on ``--nproc`` gloo ranks
through the very same code as the main job, counting memory with ``recipe.phase_memory.PhaseMemory``
(``--track-memory``: the CPU analog of ``torch.cuda.max_memory_allocated``, split by phase of the step
and by the planner's components). The plan for the same setup is printed beside it: for each phase,
each component planned vs measured, and the storages of 8 MiB or more live at each measured peak.
With ``--device cuda`` (one rank per GPU) the overall measured peak is the GPU's own
``torch.cuda.max_memory_allocated`` (written but not yet run on a GPU).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import llama
from llama import PRESETS
from llama.cli import Parser, fail, integer, run_command

from .build import DEFAULT_MODEL
from .files import write_text_atomically
from .plan import ALL_LINEAR, GiB, Setup, plan


def random_checkpoint(preset: str, layers: int, directory: Path, seed: int = 0) -> Path:
    """A checkpoint of ``preset``'s widths truncated to ``layers`` layers, random bf16 weights (std 0.02)."""
    config = dataclasses.replace(llama.LlamaConfig.preset(preset), num_hidden_layers=layers,
                                 torch_dtype="bfloat16")
    with torch.device("meta"):
        model = llama.Llama(config)
    generator = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()):
        value = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=generator) * 0.02
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value.to(torch.bfloat16)))
        del value
    llama.save_checkpoint(model, directory)
    return directory


def run(model_dir: Path, out: Path, args) -> dict:
    """Train ``--steps`` steps on ``--nproc`` ranks with memory tracking; return summary.json."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "recipe.phase_memory", "--model", str(model_dir), "--out", str(out), "--steps", str(args.steps),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--eval-batches", "1",
               "--eval-every", "1000", "--save-every", "1000", "--track-memory", "--no-progress", "--quant", args.quant,
               "--tokenizer", "byte", "--dtype", args.dtype, "--device", args.device]
    if args.activation_checkpointing:
        command.append("--activation-checkpointing")
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode:
        fail(f"the measured run failed with exit status {done.returncode} (its output is above)")
    summary = json.loads((out / "summary.json").read_text())
    for rank, record in enumerate(summary["ranks"]):
        record["phases"] = json.loads((out / f"phase_peaks_rank{rank}.json").read_text())
    return summary


def compare(planned, measured_phases: dict) -> tuple[list[str], dict]:
    """Planned vs measured per component at each phase's peak (persistent included), and the peaks."""
    lines, result = [], {}
    for phase, parts in planned.phases.items():
        measured = measured_phases.get(phase, {})
        planned_parts = {"persistent": planned.persistent_device_bytes, **parts}
        lines.append(f"{phase}: planned {sum(planned_parts.values()) / 2**20:.1f} MiB"
                     + (f", measured {measured['total'] / 2**20:.1f} MiB" if measured else ""))
        for name in sorted(set(planned_parts) | set(measured) - {"total", "storages"}):
            p, m = planned_parts.get(name, 0), measured.get(name, 0)
            if p or m > 2**20:
                lines.append(f"    {name:<20} planned {p / 2**20:>9.1f}  measured {m / 2**20:>9.1f}"
                             + (f"  ratio {p / m:.3f}" if m else ""))
        result[phase] = {"planned": planned_parts, "measured": measured}
    for kind, measured in measured_phases.items():
        lines.append(f"live at the measured peak of '{kind}' (storages >= 8 MiB): " + ", ".join(
            f"{n / 2**20:.0f} {component} ({op.split('.')[1] if '.' in op else op})"
            for n, op, component in measured["storages"]))
    return lines, result


def main(argv=None) -> dict:
    p = Parser(prog="python -m recipe.measure", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="e.g. llama-2-70b (random weights); default: --model")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: bundled tiny-llama)")
    p.add_argument("--quant", choices=("nf4", "none"), default="nf4")
    p.add_argument("--layers", type=integer(minimum=1), default=1)
    p.add_argument("--nproc", type=integer(minimum=1), default=2)
    p.add_argument("--steps", type=integer(minimum=1), default=3)
    p.add_argument("--seq-len", type=integer(minimum=2), default=128)
    p.add_argument("--batch-size", type=integer(minimum=1), default=2)
    p.add_argument("--rank", type=integer(minimum=1), default=8)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--threads", type=integer(minimum=1), default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: measure the GPU's peak")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.preset is not None and args.preset not in PRESETS:
        p.error(f"argument --preset: expected one of {sorted(PRESETS)}, got {args.preset!r}")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        p.error(f"argument --device: cuda needs a GPU per rank (--nproc {args.nproc}), "
                f"this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="home70b-measure-") as tmp:
        model_dir = args.model if args.preset is None else random_checkpoint(args.preset, args.layers, Path(tmp) / "model")
        summary = run(Path(model_dir), Path(tmp) / "run", args)
        config = llama.LlamaConfig.from_hf(model_dir)
    setup = Setup(world_size=args.nproc, batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank,
                  target_modules=ALL_LINEAR, activation_checkpointing=args.activation_checkpointing, compute_bytes=4 if args.dtype == "fp32" else 2,
                  quantize=args.quant == "nf4", device=args.device)
    planned = plan(config, setup)
    print(planned.table())
    result = {"model": args.preset or str(args.model), "layers": config.num_hidden_layers,
              "planned_gib": planned.peak_gpu_bytes / GiB,
              "measured_gib": [(r["peak_device_mib"] if args.device == "cuda" else r["peak_tensor_mib"]) / 1024
                               for r in summary["ranks"]],
              "load_peak_rss_gib": [r["load_peak_rss_mib"] / 1024 for r in summary["ranks"]],
              "rows": [(name, b / GiB) for name, b, _, _ in planned.rows],
              "peak_phase": planned.peak_phase, "measured_phases": summary["ranks"][0]["phases"]}
    lines, result["phases"] = compare(planned, summary["ranks"][0]["phases"])
    print("\n".join(lines))
    for rank, measured in enumerate(result["measured_gib"]):
        print(f"rank {rank}: planned {result['planned_gib']:.3f} GiB, measured peak on {args.device} {measured:.3f} GiB "
              f"(planned / measured = {result['planned_gib'] / measured:.3f}), "
              f"load peak RSS {result['load_peak_rss_gib'][rank]:.2f} GiB")
    if args.json:
        write_text_atomically(Path(args.json), json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    run_command(main)
