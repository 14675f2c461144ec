"""The main job's command line: QLoRA + FSDP fine-tuning of a Llama, every component swappable for the library's.

    torchrun --nproc_per_node 2 -m recipe.train                 # the default run (bundled tiny-llama)
    python -m recipe.train --steps 20                           # one process, no torchrun needed
    torchrun --nproc_per_node 2 -m recipe.train --quant bnb     # bitsandbytes Linear4bit as the base
    ... --lora peft | --shard fsdp2 | --shard hybrid | --resume | --activation-checkpointing | --offload

Default: fine-tune the bundled pretrained tiny-llama (pretrained on Python source) on the bundled
instruction set (``recipe/instruct/data``: questions about Python's standard library) and print the
held-out loss on the response tokens before and after, greedy answers to a few held-out questions before
and after, tokens/s and peak memory per rank; the adapter is written in PEFT's format to ``<out>/adapter``.
``--data FILE.jsonl`` trains on your own examples, ``--data pydoc`` on plain text (``recipe/corpus.py``).

This file only parses the flags into a ``recipe.job.JobConfig`` (a ``BuildOptions`` and a
``recipe.loop.LoopConfig``) and runs it. Device (``--device``, ``recipe/device.py``): each rank on its own
GPU (``cuda:LOCAL_RANK``, NCCL) when the node has one per process, else on the CPU (gloo). Compute dtype
(``--dtype``): bf16 on a GPU and where the CPU multiplies bf16 natively (AVX512-BF16/AMX), fp32 otherwise.
A user error (a bad flag value, a missing file) prints one ``error:`` line and exits with status 2
(``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama.cli import Parser, integer, number, run_command

from .build import CHOICES, DEFAULT_MODEL, BuildOptions
from .device import DEVICES, close_distributed, default_dtype, init_distributed, resolve_device
from .job import DTYPES, JobConfig, run_job
from .loop import LoopConfig, StepCallback
from .instruct.templates import BUILTIN
from .plan import ALL_LINEAR


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, each numeric one checked against its domain while parsing (before any model loads)."""
    p = Parser(prog="torchrun --nproc_per_node N -m recipe.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: bundled tiny-llama)")
    p.add_argument("--data", default=None, help="FILE.jsonl (plain/alpaca/chat, detected), 'pydoc' (the pydoc "
                   "topics as plain text), a text file or a directory of them (default: the bundled instruction set)")
    p.add_argument("--heldout", default=None, help="held-out FILE.jsonl (default: 10%% of --data's examples by CRC32)")
    p.add_argument("--template", choices=("auto", *BUILTIN), default="auto",
                   help="chat template of JSONL data (auto: the checkpoint's own, else chatml)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="JSONL: pack examples into --seq-len rows (--no-packing: pad each batch)")
    p.add_argument("--train-on-prompt", action="store_true", help="JSONL: count the prompt tokens in the loss too")
    p.add_argument("--drop-long", action="store_true", help="JSONL: drop examples longer than --seq-len "
                   "(default: truncate them, counted in the report)")
    p.add_argument("--samples", type=integer(minimum=0), default=None, help="held-out questions answered greedily before and after "
                   "training, by the whole base loaded on rank 0 (default: 4 for the bundled set, 0 for other data)")
    p.add_argument("--tokenizer", choices=("auto", "byte"), default="auto",
                   help="byte: the byte tokenizer for any base with vocab >= 258 (e.g. random-weight test models)")
    for name, choices in CHOICES.items():
        p.add_argument(f"--{name}", choices=choices, default=choices[0])
    p.add_argument("--shard-size", type=integer(minimum=1), default=None,
                   help="--shard hybrid / fsdp2-hybrid: ranks per shard group (default: the ranks of one node, "
                        "torchrun's LOCAL_WORLD_SIZE); the groups are replicated across nodes")
    p.add_argument("--rank", type=integer(minimum=1), default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=number(above=0), default=16.0)
    p.add_argument("--dropout", type=number(minimum=0, below=1), default=0.0)
    p.add_argument("--dora", action="store_true")
    p.add_argument("--target-modules", type=module_names, default=",".join(ALL_LINEAR))
    p.add_argument("--seq-len", type=integer(minimum=2), default=256, help="tokens per window (>= 2: one prediction)")
    p.add_argument("--batch-size", type=integer(minimum=1), default=4, help="sequences per rank per micro-batch")
    p.add_argument("--grad-accum", type=integer(minimum=1), default=1)
    p.add_argument("--steps", type=integer(minimum=1), default=300)
    p.add_argument("--lr", type=number(above=0), default=3e-3)
    p.add_argument("--warmup", type=integer(minimum=1), default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--max-grad-norm", type=number(above=0), default=1.0)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: this rank's GPU (LOCAL_RANK) with NCCL when the node has one GPU per process, "
                        "else the CPU with gloo")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute dtype (default: bf16 on CUDA or a CPU with native bf16 matmuls, else fp32)")
    p.add_argument("--eval-every", type=integer(minimum=1), default=100)
    p.add_argument("--eval-batches", type=integer(minimum=1), default=8)
    p.add_argument("--save-every", type=integer(minimum=1), default=100)
    p.add_argument("--out", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    p.add_argument("--seed", type=integer(minimum=0), default=0)
    p.add_argument("--memory-gib", type=number(above=0), default=None, help="memory per rank for the plan check")
    p.add_argument("--track-memory", action="store_true", help="count live tensor bytes (slower)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="Chrome trace of a few steps per rank in <out>/profile, and where a step's time goes")
    return p.parse_args(argv)


def module_names(text: str) -> tuple[str, ...]:
    """``--target-modules``: comma-separated module names, none empty."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated module names, got {text!r}")
    return names


def job_config(args: argparse.Namespace, device: torch.device = torch.device("cpu")) -> JobConfig:
    """The flags as the typed configuration the job runs (``--dtype`` defaulting for ``device``)."""
    build = BuildOptions(model=args.model, quant=args.quant, lora=args.lora, shard=args.shard,
                         shard_size=args.shard_size, rank=args.rank,
                         alpha=args.alpha, dropout=args.dropout, dora=args.dora,
                         target_modules=args.target_modules,
                         compute_dtype=DTYPES[args.dtype or default_dtype(device)], offload=args.offload,
                         seed=args.seed, device=device)
    loop = LoopConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, grad_accum=args.grad_accum,
                      max_grad_norm=args.max_grad_norm, eval_every=args.eval_every, save_every=args.save_every,
                      out=Path(args.out), progress=not args.no_progress)
    return JobConfig(build=build, loop=loop, data=args.data, heldout=args.heldout, template=args.template,
                     packing=args.packing, train_on_prompt=args.train_on_prompt, drop_long=args.drop_long,
                     samples=args.samples, tokenizer=args.tokenizer, seq_len=args.seq_len,
                     batch_size=args.batch_size, eval_batches=args.eval_batches,
                     activation_checkpointing=args.activation_checkpointing, resume=args.resume,
                     memory_gib=args.memory_gib, track_memory=args.track_memory, profile=args.profile)


def run(args: argparse.Namespace, on_step: StepCallback | None = None) -> dict:
    """Set up this rank's device and process group, run the job of ``args``; return its summary."""
    device = resolve_device(args.device)
    init_distributed(device)
    return run_job(job_config(args, device), on_step)


def main(argv=None, on_step: StepCallback | None = None) -> dict:
    return run(parse_args(argv), on_step)


def cli(argv=None, on_step: StepCallback | None = None) -> None:
    """`main` as a command (``llama.cli.run_command``: a user error is one ``error:`` line from rank 0 and
    exit status 2); the process group is closed at the end either way."""
    try:
        run_command(lambda argv: main(argv, on_step), argv)
    finally:
        close_distributed()


if __name__ == "__main__":
    cli()
