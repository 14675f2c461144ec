"""End to end, 2 ranks: our QLoRA + FSDP recipe vs the library stack, same model, data and hyper-parameters.

    python -m benchmarks.e2e [--steps 60 --seq-len 128 --batch-size 4]
    python -m benchmarks.e2e --device cuda --ranks 1     # on one GPU (benchmarks/gpu.sh); NCCL needs a GPU per rank

(a) ours     ``torchrun -m recipe.train``: nf4.Linear4bit + lora.LoRALinear + sharding.shard_model
(b) library  transformers ``LlamaForCausalLM`` loaded 4-bit by bitsandbytes (NF4, double quantization,
             packed bytes stored as the compute dtype -- the FSDP "quant_storage" trick), PEFT
             ``get_peft_model``, PyTorch FSDP2 ``fully_shard`` per decoder layer and at the root.
Both fine-tune the bundled tiny-llama on the pydoc-topics corpus with the same sampler (same batches),
the same LoRA initialisation (``recipe.build.reset_lora_init``), AdamW, warmup + cosine, clipping at 1.0.
Each runs in its own ``torchrun`` so the memory numbers do not mix. Per rank: tokens/s of the training
steps, peak RSS while training (glibc told to return freed blocks over 64 KiB to the OS, so RSS tracks
live memory), on a GPU also the peak of ``torch.cuda.max_memory_allocated`` while loading and while
training, and the held-out loss after N steps; ratios ours / library. Targets (issue 6): >= 1.0x
tokens/s at <= 1.0x memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def library_worker(args) -> None:
    """One rank of the library stack (run under torchrun by `main`)."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import llama
    from recipe import data
    from recipe.build import LINEARS, reset_lora_init
    from recipe.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from recipe.device import all_mean, device_peak_mib, init_distributed, reset_device_peak, resolve_device
    from recipe.train import lr_at

    device = resolve_device(args.device)
    init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed + rank)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    train_ids, heldout_ids = data.tokenize_splits(data.load_documents(None), llama.load_tokenizer(args.model))
    train_windows, heldout = data.windows(train_ids, args.seq_len), data.windows(heldout_ids, args.seq_len)
    rss_before = current_rss_bytes()
    reset_peak_rss()
    reset_device_peak(device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = LlamaForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=dtype, device_map={"": str(device)})
    for module in model.modules():  # bitsandbytes' CPU eval path repacks the bytes in place, after which
        if hasattr(module, "support_avx512bf16_for_cpu"):  # backward no longer reaches the input: keep it off
            module.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=list(LINEARS)))
    reset_lora_init(model, args.seed)
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    load_peak, load_peak_device = peak_rss_bytes(), device_peak_mib(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sampler = data.Sampler(train_windows, args.batch_size, rank, world, seed=args.seed)

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = [model(input_ids=ids.to(device), labels=ids.to(device)).loss.item()
                  for ids in data.eval_batches(heldout, args.batch_size, args.eval_batches, rank, world)]
        model.train()
        return all_mean(sum(losses) / len(losses))

    before = evaluate()
    reset_peak_rss()
    reset_device_peak(device)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        ids = sampler.next_batch().to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peaks = [None] * world
    dist.all_gather_object(peaks, {"peak_rss_mib": peak_rss_bytes() / 2**20, "load_peak_rss_mib": load_peak / 2**20,
                                   "rss_before_mib": rss_before / 2**20, "peak_device_mib": device_peak_mib(device),
                                   "load_peak_device_mib": load_peak_device})
    after = evaluate()
    if rank == 0:
        summary = {"eval_loss_before": before, "eval_loss_after": after, "steps": args.steps, "seconds": elapsed,
                   "tokens_per_s": world * args.batch_size * args.seq_len * args.steps / elapsed, "ranks": peaks}
        Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    dist.destroy_process_group()


def torchrun(ranks: int, script_args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                    *script_args],
                   check=True, cwd=ROOT, env=env)


def main() -> None:
    from recipe.build import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: recipe.train's default")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as recipe.train's --device")
    p.add_argument("--ranks", type=int, default=2, help="processes (on CUDA: at most one per GPU)")
    p.add_argument("--out", default=None)
    p.add_argument("--library-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    from recipe.device import default_dtype, resolve_device

    if args.library_worker:
        return library_worker(args)
    if args.ranks < 1:
        raise ValueError(f"--ranks must be at least 1, got {args.ranks}")
    device = resolve_device(args.device, per_node=args.ranks)  # the device each of the ranks will take
    if device.type == "cuda" and args.ranks > torch.cuda.device_count():
        raise ValueError(f"--ranks {args.ranks} on CUDA needs a GPU per rank; {torch.cuda.device_count()} visible")
    args.dtype = args.dtype or default_dtype(device)
    shared = ["--model", args.model, "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size",
              str(args.batch_size), "--rank", str(args.rank), "--alpha", str(args.alpha), "--lr", str(args.lr),
              "--eval-batches", str(args.eval_batches), "--seed", str(args.seed), "--dtype", args.dtype,
              "--device", device.type]
    out = Path(args.out or tempfile.mkdtemp(prefix="home70b-e2e-"))
    (out / "ours").mkdir(parents=True, exist_ok=True)
    (out / "library").mkdir(parents=True, exist_ok=True)
    torchrun(args.ranks, ["-m", "recipe.train", *shared, "--out", str(out / "ours"), "--eval-every", str(args.steps),
              "--save-every", str(args.steps), "--no-progress"])
    torchrun(args.ranks, [str(Path(__file__).resolve()), "--library-worker", *shared, "--out", str(out / "library")])
    ours, lib = (json.loads((out / name / "summary.json").read_text()) for name in ("ours", "library"))
    rows = [(f"tokens/s ({args.ranks} ranks)", ours["tokens_per_s"], lib["tokens_per_s"], "{:.0f}")]
    for r in range(args.ranks):
        rows.append((f"peak RSS training, rank {r} (MiB)", ours["ranks"][r]["peak_rss_mib"],
                     lib["ranks"][r]["peak_rss_mib"], "{:.0f}"))
        rows.append((f"peak RSS loading, rank {r} (MiB)", ours["ranks"][r]["load_peak_rss_mib"],
                     lib["ranks"][r]["load_peak_rss_mib"], "{:.0f}"))
        if device.type == "cuda":
            rows.append((f"peak GPU allocated training, rank {r} (MiB)", ours["ranks"][r]["peak_device_mib"],
                         lib["ranks"][r]["peak_device_mib"], "{:.0f}"))
            rows.append((f"peak GPU allocated loading, rank {r} (MiB)", ours["ranks"][r]["load_peak_device_mib"],
                         lib["ranks"][r]["load_peak_device_mib"], "{:.0f}"))
    rows.append(("held-out loss before", ours["eval_loss_before"], lib["eval_loss_before"], "{:.4f}"))
    rows.append((f"held-out loss after {args.steps} steps", ours["eval_loss_after"], lib["eval_loss_after"], "{:.4f}"))
    print(f"\nend to end, {args.ranks} ranks on {device.type}, batch {args.batch_size} x seq {args.seq_len} per rank, r={args.rank}, "
          f"{args.steps} steps, {args.dtype} compute")
    print(f"| {'':<34} | {'ours':>10} | {'library':>10} | {'ours/lib':>8} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 10}|")
    for name, a, b, fmt in rows:
        print(f"| {name:<34} | {fmt.format(a):>10} | {fmt.format(b):>10} | {a / b:>7.3f}x |")


if __name__ == "__main__":
    main()
