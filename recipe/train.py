"""The main job: QLoRA + FSDP fine-tuning of a Llama, every component swappable for the library version.

    torchrun --nproc_per_node 2 -m recipe.train                 # the default run (bundled tiny-llama)
    python -m recipe.train --steps 20                           # one process, no torchrun needed
    torchrun --nproc_per_node 2 -m recipe.train --quant bnb     # bitsandbytes Linear4bit as the base
    ... --lora peft | --shard fsdp2 | --resume | --activation-checkpointing | --offload

Default: fine-tune the bundled pretrained tiny-llama (pretrained on Python source) on a different
domain -- the English documentation of ``pydoc_data/topics.py`` -- and print held-out loss before and
after, tokens/s and peak memory per rank; the adapter is written in PEFT's format to ``<out>/adapter``.

The loop (one optimizer step): ``--grad-accum`` micro-batches, each rank taking its ``--batch-size``
rows of the global batch, loss / grad_accum backward (gradients reduce-scattered into the shards),
global-norm clipping, AdamW on the local fp32 master shards, linear warmup then cosine decay. Every
``--eval-every`` steps the held-out loss; every ``--save-every`` steps an atomic checkpoint
(``recipe/checkpoint.py``); one JSON line per step in ``<out>/metrics.jsonl``.

Device (``--device``, ``recipe/device.py``): each rank on its own GPU (``cuda:LOCAL_RANK``, NCCL) when
the node has one per process, else on the CPU (gloo). Compute dtype (``--dtype``): bf16 on a GPU and where the CPU
multiplies bf16 natively (AVX512-BF16/AMX: measured 1.16x faster than fp32 here), fp32 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, data
from .build import DEFAULT_MODEL, LINEARS, BuildOptions, build
from .device import (DEVICES, all_mean, default_dtype, device_peak_mib, init_distributed, memory_budget,
                     reset_device_peak, resolve_device)
from .memory import TensorMemory, peak_rss_bytes, reset_peak_rss
from .plan import GiB, Setup, plan

STEP_SLEEP_S = float(os.environ.get("HOME70B_STEP_SLEEP_S", 0))  # tests: slow a run down to SIGKILL it mid-way


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m recipe.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: bundled tiny-llama)")
    p.add_argument("--data", default=None, help="text file or directory (default: pydoc topics)")
    p.add_argument("--tokenizer", choices=("auto", "byte"), default="auto",
                   help="byte: the byte tokenizer for any base with vocab >= 258 (e.g. random-weight test models)")
    p.add_argument("--quant", choices=("nf4", "bnb", "none"), default="nf4")
    p.add_argument("--lora", choices=("ours", "peft"), default="ours")
    p.add_argument("--shard", choices=("ours", "fsdp2", "none"), default="ours")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dora", action="store_true")
    p.add_argument("--target-modules", default=",".join(LINEARS))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: this rank's GPU (LOCAL_RANK) with NCCL when the node has one GPU per process, "
                        "else the CPU with gloo")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="compute dtype (default: bf16 on CUDA or a CPU with native bf16 matmuls, else fp32)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--out", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-gib", type=float, default=None, help="memory per rank for the plan check")
    p.add_argument("--track-memory", action="store_true", help="count live tensor bytes (slower)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warmup to ``--lr``, then cosine decay to 10% of it (a function of the step: no state)."""
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_plan(args, model_config, world: int, device: torch.device, log) -> None:
    """Warn, with the plan's table, when the planned peak per rank exceeds the memory available."""
    setup = Setup(world_size=world, gpu_bytes=memory_budget(device, args.memory_gib), batch_size=args.batch_size, seq_len=args.seq_len,
                  rank=args.rank, target_modules=tuple(t for t in args.target_modules.split(",") if t in LINEARS)
                  or LINEARS, dora=args.dora, activation_checkpointing=args.activation_checkpointing,
                  offload=args.offload, quantize=args.quant != "none", compute_bytes=2 if args.dtype == "bf16" else 4)
    result = plan(model_config, setup)
    if not result.fits:
        log(f"WARNING: the planned memory per rank exceeds the {setup.gpu_bytes / GiB:.1f} GiB available; "
            f"lower --batch-size/--seq-len or add --activation-checkpointing/--offload\n{result.table()}")


def enable_activation_checkpointing(layers) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (non-reentrant)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


@torch.no_grad()
def evaluate(built, heldout, args, rank: int, world: int) -> float:
    """Mean held-out loss over ``--eval-batches`` fixed global batches, in eval mode (no dropout, so no
    random numbers are drawn: evaluating does not change the training run)."""
    built.model.eval()
    losses = []
    for ids in data.eval_batches(heldout, args.batch_size, args.eval_batches, rank, world):
        ids = ids.to(built.device)
        losses.append(built.forward(ids, labels=ids)[1].item())
    built.model.train()
    return all_mean(sum(losses) / len(losses))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    init_distributed(device)
    args.dtype = args.dtype or default_dtype(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed + rank)  # dropout masks differ per rank; LoRA init does not use it
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    import llama
    config = llama.LlamaConfig.from_hf(args.model)
    tokenizer = llama.ByteTokenizer() if args.tokenizer == "byte" else llama.load_tokenizer(args.model)
    train_ids, heldout_ids = data.tokenize_splits(data.load_documents(args.data), tokenizer)
    largest = int(max(train_ids.max(), heldout_ids.max()))
    if largest >= config.vocab_size:
        raise ValueError(f"the tokenizer of --model {args.model} produces token id {largest}, but the model's "
                         f"vocab_size is {config.vocab_size}: tokenizer.json and config.json do not belong together")
    train_windows, heldout = data.windows(train_ids, args.seq_len), data.windows(heldout_ids, args.seq_len)
    if world * args.batch_size > len(train_windows) or world * args.batch_size > len(heldout):
        raise ValueError(f"world size {world} is larger than this run can use: {world} ranks x --batch-size "
                         f"{args.batch_size} needs that many windows of {args.seq_len} tokens, the corpus has "
                         f"{len(train_windows)} (train) and {len(heldout)} (held-out)")
    check_plan(args, config, world, device, log)

    memory = TensorMemory(record_peak=True) if args.track_memory else None
    if memory:
        memory.__enter__()
    opts = BuildOptions(model=args.model, quant=args.quant, lora=args.lora, shard=args.shard, rank=args.rank,
                        alpha=args.alpha, dropout=args.dropout, dora=args.dora,
                        target_modules=tuple(args.target_modules.split(",")), compute_dtype=dtype,
                        offload=args.offload, seed=args.seed, device=device)
    built = build(opts)
    if args.activation_checkpointing:
        enable_activation_checkpointing(built.model.model.layers)
    optimizer = torch.optim.AdamW(built.parameters, lr=args.lr, weight_decay=0.0)
    sampler = data.Sampler(train_windows, args.batch_size, rank, world, seed=args.seed)
    fingerprint = {k: getattr(args, k) for k in ("quant", "lora", "shard", "rank", "alpha", "seq_len", "batch_size",
                                                  "grad_accum", "steps", "lr", "seed", "target_modules", "dtype")}
    fingerprint["base"] = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads", "vocab_size")}
    start = 0
    if args.resume:
        found = checkpoint.latest(out / "checkpoints")
        if found is None:
            log(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        else:
            meta = checkpoint.load(found, built.parameters, optimizer, fingerprint)
            sampler.load_state_dict(meta["sampler"])
            start = meta["step"]
            log(f"resumed from step {start}")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # keep only the lines of steps the checkpoint covers: a resumed log equals an unbroken one
        kept = []
        for line in metrics_path.read_text().splitlines() if start and metrics_path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                break
            if record["step"] <= start:
                kept.append(line)
        metrics_path.write_text("".join(line + "\n" for line in kept))
    log(f"rank 0 of {world}: {args.quant} base, {args.lora} LoRA (r={args.rank}, {len(built.lora_names)} layers), "
        f"{args.shard} sharding, {args.dtype} on {device}; load peak RSS {built.load_peak_rss / 2**20:.0f} MiB")

    eval_before = evaluate(built, heldout, args, rank, world)
    log(f"held-out loss before: {eval_before:.4f}")
    tokens_per_step = world * args.batch_size * args.seq_len * args.grad_accum
    reset_peak_rss()
    reset_device_peak(device)
    if memory:
        memory.reset_peak()
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True)
    t0, eval_loss, eval_seconds = time.perf_counter(), None, 0.0
    for step in range(start, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            ids = sampler.next_batch().to(device, non_blocking=True)
            loss = built.forward(ids, labels=ids)[1]
            (loss / args.grad_accum).backward()
            loss_sum += loss.item()
        grad_norm = clip(built, args)
        time.sleep(STEP_SLEEP_S)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": all_mean(loss_sum / args.grad_accum), "grad_norm": grad_norm,
                  "lr": lr_at(step, args)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            eval_start = time.perf_counter()
            record["eval_loss"] = eval_loss = evaluate(built, heldout, args, rank, world)
            eval_seconds += time.perf_counter() - eval_start
        elapsed = time.perf_counter() - t0 - eval_seconds
        record["tokens_per_s"] = tokens_per_step * (step + 1 - start) / elapsed
        record["peak_rss_mib"] = peak_rss_bytes() / 2**20
        if device.type == "cuda":
            record["peak_device_mib"] = device_peak_mib(device)
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 mem=f"{record.get('peak_device_mib', record['peak_rss_mib']):.0f}M")
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint.save(out / "checkpoints", step + 1, built.parameters, optimizer,
                            {**fingerprint, "sampler": sampler.state_dict()})
    if progress:
        progress.close()
    if memory:
        memory.__exit__(None, None, None)
    summary = finish(built, args, out, rank, world, eval_before, eval_loss, start, t0 + eval_seconds, tokens_per_step,
                     memory, log)
    dist.barrier()
    return summary


def clip(built, args) -> float:
    """Global gradient norm over all ranks' shards, clipped to ``--max-grad-norm``; returns the norm."""
    import sharding

    if built.sharded is not None:
        return float(sharding.clip_grad_norm_(built.sharded, args.max_grad_norm))
    if args.shard == "none" and dist.get_world_size() > 1:  # plain data parallel: average the gradients
        for p in built.parameters:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    norm = torch.nn.utils.clip_grad_norm_(built.parameters, args.max_grad_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def finish(built, args, out, rank, world, eval_before, eval_after, start, t0, tokens_per_step, memory, log) -> dict:
    """Write the adapter, gather per-rank peaks, print the summary."""
    from .adapter import save_trained_adapter

    elapsed = time.perf_counter() - t0
    save_trained_adapter(built, args, out / "adapter")
    peaks = [None] * world
    dist.all_gather_object(peaks, {"peak_rss_mib": peak_rss_bytes() / 2**20,
                                   "load_peak_rss_mib": built.load_peak_rss / 2**20,
                                   "peak_device_mib": device_peak_mib(built.device),
                                   "load_peak_device_mib": built.load_peak_device_mib,
                                   "peak_tensor_mib": memory.peak / 2**20 if memory else None,
                                   "at_peak_mib": [(round(b / 2**20, 1), op) for b, op in memory.at_peak[:8]] if memory else None})
    summary = {"eval_loss_before": eval_before, "eval_loss_after": eval_after, "steps": args.steps - start,
               "tokens_per_s": tokens_per_step * (args.steps - start) / elapsed, "seconds": elapsed, "ranks": peaks}
    log(f"held-out loss: {eval_before:.4f} -> {eval_after:.4f}; {summary['tokens_per_s']:.0f} tokens/s over "
        f"{summary['steps']} steps ({elapsed:.1f} s of training, evaluation excluded)")
    for r, p in enumerate(peaks):
        log(f"rank {r}: peak RSS {p['peak_rss_mib']:.0f} MiB training, {p['load_peak_rss_mib']:.0f} MiB loading"
            + (f", peak tensors {p['peak_tensor_mib']:.1f} MiB" if p["peak_tensor_mib"] is not None else "")
            + (f"; peak {built.device.type} memory allocated {p['peak_device_mib']:.0f} MiB training, "
               f"{p['load_peak_device_mib']:.0f} MiB loading" if p["peak_device_mib"] is not None else ""))
    log(f"adapter written to {out / 'adapter'} (PEFT format)")
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    try:
        main()
    finally:
        # The sharded model's hooks hold it in reference cycles, and with it the process group and the
        # handles of finished async all-gathers. Collect them now, while torch.distributed is whole: left
        # to interpreter shutdown, a rank aborted ("terminate called without an active exception") in
        # about 1 run in 4 on a loaded CPU. Then close the group, as torch.distributed asks.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
