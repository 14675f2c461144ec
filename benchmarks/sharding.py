"""Train steps of a small Llama (``llama.Llama``, random init): ours (sharding) vs PyTorch FSDP2 vs no
sharding, with prefetch on and off. One table.

    torchrun --nproc_per_node 2 -m benchmarks.sharding [--layers 8 --dim 512 --steps 4] [--quick]

Per rank: median step time (forward + backward + AdamW step), peak memory during the steps
(max_memory_allocated on GPU; on CPU the peak of the process RSS above its level before the model was
built, sampled every millisecond, with glibc told to return every freed block over 64 KiB), and the
bytes of parameters and optimizer state the rank holds. Units are the decoder layers; the root holds
the embedding, the final norm and lm_head, for both sides.

Prefetch: ours gathers the next unit while the current one computes (forward and backward) when on.
FSDP2 always prefetches one module in backward; "prefetch" sets its explicit forward prefetch of the
next layer too (``set_modules_to_forward_prefetch``), its default without. "(c) no sharding" trains an
unsharded copy on each rank's own batch with no communication: the compute-only floor.
Targets: with prefetch on, step time and peak memory <= 1.0x FSDP2's; parameter bytes per rank =
total / world (+ padding).

Devices as ``recipe.train --device auto``: NCCL on a GPU per process when every process on the node
has one, else gloo on the CPU (so 2 ranks on a 1-GPU machine run on the CPU).
"""
import argparse
import ctypes
import gc
import os
import statistics
import threading
import time

import torch
import torch.distributed as dist

import llama
from llama.cli import Parser, integer, run_command
import sharding
from recipe.device import close_distributed, init_distributed, resolve_device

from . import timed


class PeakMemory:
    """Peak bytes during a block: CUDA allocator peak, or sampled RSS above the starting RSS on CPU."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            libc = ctypes.CDLL("libc.so.6")
            # Every allocation over 64 KiB gets its own mapping, returned to the OS when freed: RSS then
            # follows the live tensors instead of what glibc keeps cached (M_MMAP_THRESHOLD is -3).
            libc.mallopt(-3, 64 * 1024)
            libc.malloc_trim(0)
            self.start, self.running = self.rss(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()


def held_bytes(tensors):
    """Bytes this rank holds (an FSDP2 DTensor counts its local shard only)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def warm_up_process(device):
    """Pay one-time costs (AdamW imports torch._dynamo, first kernels) before anything is measured."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    model = llama.Llama(llama_config(argparse.Namespace(layers=1, dim=64, heads=4, vocab=16))).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, 16, (2, 5), device=device)
    model(tokens, labels=tokens)[1].backward()
    optimizer.step()
    dist.barrier()


def llama_config(args) -> llama.LlamaConfig:
    """Llama-shaped: SwiGLU width 8/3 of the model width (rounded to 64), 4 query heads per K/V head."""
    return llama.LlamaConfig(hidden_size=args.dim, intermediate_size=max(64, int(8 * args.dim / 3) // 64 * 64),
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=max(1, args.heads // 4), vocab_size=args.vocab)


def wrap(config, model, device, world):
    """(callable model, parameters for the optimizer) under ``config``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = list(model.model.layers)
    if config.startswith("ours"):
        sharded = sharding.shard_model(model, layers, prefetch=config == "ours")
        return sharded, sharded.parameters()
    if config.startswith("fsdp2"):
        mesh = init_device_mesh(device.type, (world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if config == "fsdp2":  # explicit forward prefetch of the next layer
            for layer, following in zip(layers, layers[1:]):
                layer.set_modules_to_forward_prefetch([following])
    return model, list(model.parameters())


def run(config, args, device, rank, world):
    """Build, wrap, train; return this rank's numbers."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
               for _ in range(args.steps + args.warmup)]
    times = []
    with PeakMemory(device) as memory:
        torch.manual_seed(0)
        wrapped, parameters = wrap(config, llama.Llama(llama_config(args)).to(device), device, world)
        optimizer = torch.optim.AdamW(parameters, lr=1e-4)

        def step(tokens):
            wrapped(tokens, labels=tokens)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
        for index, tokens in enumerate(batches):
            if config != "none":
                dist.barrier()
            seconds = timed(lambda: step(tokens), device)
            if index >= args.warmup:
                times.append(seconds)
    held = list(parameters)
    if config.startswith("ours"):  # frozen groups (here: none) are held too
        held += [g.local for u in wrapped.units for g in u.groups if not g.trainable]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    total = sum(p.numel() * 4 for p in llama.Llama(llama_config(args)).parameters())
    return {"ms": 1e3 * statistics.median(times), "peak": memory.peak, "params": held_bytes(held),
            "optimizer": held_bytes(state), "total": total}


CONFIGS = {"ours": "(a) ours, prefetch", "fsdp2": "(b) FSDP2, forward prefetch set",
           "ours_no_prefetch": "(a') ours, no prefetch", "fsdp2_default": "(b') FSDP2 default",
           "none": "(c) no sharding"}


def print_table(results, args, world, device):
    memory_kind = "max_memory_allocated" if device.type == "cuda" else "RSS rise"
    print(f"{world} ranks, {'GPU' if device.type == 'cuda' else 'CPU'}; llama.Llama {args.layers} layers x dim "
          f"{args.dim}, vocab {args.vocab}: {results['none'][0]['total'] / 2**20:.1f} MiB fp32 params; batch "
          f"{args.batch}x{args.seq} per rank; median of {args.steps} steps after {args.warmup} warm-up, best of "
          f"{args.rounds} rounds")
    print(f"| config | step ms per rank | peak MiB per rank ({memory_kind}) | params MiB/rank | optimizer MiB/rank |")
    print("|---|---|---|---|---|")
    per_rank = lambda rows, key, scale: " / ".join(f"{r[key] / scale:.1f}" for r in rows)  # noqa: E731
    for config, label in CONFIGS.items():
        rows = results[config]
        print(f"| {label} | {per_rank(rows, 'ms', 1)} | {per_rank(rows, 'peak', 2**20)} | "
              f"{rows[0]['params'] / 2**20:.2f} | {rows[0]['optimizer'] / 2**20:.2f} |")
    worst = lambda rows, key: max(r[key] for r in rows)  # noqa: E731
    ratio = lambda key, a, b: worst(results[a], key) / max(worst(results[b], key), 1)  # noqa: E731
    for ours, theirs, label in (("ours", "fsdp2", "prefetch on"), ("ours_no_prefetch", "fsdp2_default", "prefetch off")):
        print(f"ours / FSDP2, {label}: step time {ratio('ms', ours, theirs):.3f}x, peak memory "
              f"{ratio('peak', ours, theirs):.3f}x (targets <= 1.0 with prefetch on)")
    print(f"param bytes per rank {worst(results['ours'], 'params') / (results['ours'][0]['total'] / world):.4f}x "
          f"total/world (target 1 + padding)")


def main(argv=None):
    parser = Parser(prog="python -m benchmarks.sharding", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=integer(minimum=1), default=8)
    parser.add_argument("--dim", type=integer(minimum=1), default=512)
    parser.add_argument("--heads", type=integer(minimum=1), default=8)
    parser.add_argument("--vocab", type=integer(minimum=1), default=4096)
    parser.add_argument("--seq", type=integer(minimum=1), default=64)
    parser.add_argument("--batch", type=integer(minimum=1), default=2, help="sequences per rank per step")
    parser.add_argument("--steps", type=integer(minimum=1), default=4)
    parser.add_argument("--warmup", type=integer(minimum=0), default=1)
    parser.add_argument("--rounds", type=integer(minimum=1), default=2, help="repeat all configs; keep each one's fastest")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: seconds (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.heads, args.vocab, args.seq, args.steps, args.rounds = 2, 64, 4, 256, 16, 2, 1
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        parser.error(f"argument --dim: expected a multiple of 2 x --heads ({2 * args.heads}: even head width), got {args.dim}")

    device = resolve_device("auto")
    init_distributed(device)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        warm_up_process(device)
        results = {}
        for _ in range(args.rounds):  # interleaved rounds, best of each: less at the mercy of a busy machine
            for config in CONFIGS:
                everyone = [None] * world
                dist.all_gather_object(everyone, run(config, args, device, rank, world))
                if config not in results or max(r["ms"] for r in everyone) < max(r["ms"] for r in results[config]):
                    results[config] = everyone
        if rank == 0:
            print_table(results, args, world, device)
    finally:
        close_distributed()  # the models' hook cycles collected while the group is whole, then closed


if __name__ == "__main__":
    run_command(main)
