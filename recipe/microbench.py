"""This machine's rates for the step-time model (``recipe.timemodel.Machine``), measured per rank.

    python -m recipe.microbench --ranks 2 --dtype bf16

``ranks`` gloo processes run each measurement at the same time, as training ranks would share the
cores: matmul FLOP/s (a [tokens, h] x [h, o] product in the compute dtype), copy bandwidth (bytes read
+ written by ``copy_`` of a 64 MiB tensor), NF4 dequantization (codes and absmax read + values written
per second), all-gather bandwidth over gloo (payload per second of a 16 MiB ``all_gather_into_tensor``),
and the fixed cost of one small ATen operator. Each is the median of a few repeats. Numbers measured on
a machine shared with other work move with its load; the model is only as good as these.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .timemodel import Machine


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rates(dtype: torch.dtype, size: int, repeats: int) -> dict[str, float]:
    """The rates of this process (see the module doc); ``size`` scales the matmul (h = o = size)."""
    import nf4

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, 2 * size, dtype=dtype)
    matmul = 2 * size * size * 2 * size / _median_seconds(lambda: a @ b, repeats)
    src = torch.empty(16 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = 2 * src.nbytes / _median_seconds(lambda: dst.copy_(src), repeats)
    qw = nf4.quantize(torch.randn(size, 2 * size))
    stored = qw.packed.nbytes + qw.numel / 64  # codes + 8-bit absmax
    dequant = (stored + qw.numel * a.element_size()) / _median_seconds(lambda: nf4.dequantize(qw, dtype), repeats)
    one = torch.ones(1)
    op = _median_seconds(lambda: [one.add(one) for _ in range(1000)], repeats) / 1000
    world = dist.get_world_size()
    shard = torch.ones(4 * 2**20 // world, dtype=torch.float32)
    full = torch.empty(shard.numel() * world)
    dist.barrier()
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather = full.nbytes / _median_seconds(lambda: all_gather(full, shard), repeats)
    return {"matmul_flops": matmul, "copy_bytes_per_s": copy, "dequantize_bytes_per_s": dequant,
            "gather_bytes_per_s": gather, "op_seconds": op}


def _rank(rank: int, world: int, store: str, dtype: str, size: int, repeats: int, threads: int, out) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rates = measure_rates(getattr(torch, dtype), size, repeats)
    gathered = [None] * world
    dist.all_gather_object(gathered, rates)
    if rank == 0:
        out.put({k: statistics.median(r[k] for r in gathered) for k in rates})
    dist.destroy_process_group()


def measure_machine(ranks: int = 2, dtype: str = "bfloat16", size: int = 1024, repeats: int = 5,
                    threads: int | None = None) -> Machine:
    """Spawn ``ranks`` gloo processes, measure, return the median rank's rates as a ``Machine``."""
    if ranks < 1 or size < 64 or repeats < 1:
        raise ValueError(f"need ranks >= 1, size >= 64, repeats >= 1; got {ranks}, {size}, {repeats}")
    threads = threads or max(1, (os.cpu_count() or 1) // ranks)
    queue = mp.get_context("spawn").SimpleQueue()
    store = tempfile.NamedTemporaryFile(prefix="home70b-bench-", delete=False).name
    try:
        mp.spawn(_rank, args=(ranks, store, dtype, size, repeats, threads, queue), nprocs=ranks)
        rates = queue.get()
    finally:
        os.unlink(store) if os.path.exists(store) else None
    return Machine(name=f"this CPU ({ranks} ranks x {threads} threads, {dtype})", host_link_bytes_per_s=None,
                   source="measured by recipe.microbench", **rates)


def describe(machine: Machine) -> str:
    return (f"{machine.name}: matmul {machine.matmul_flops / 1e9:.1f} GFLOP/s, copy {machine.copy_bytes_per_s / 1e9:.2f} GB/s, "
            f"NF4 dequantize {machine.dequantize_bytes_per_s / 1e9:.2f} GB/s, all-gather {machine.gather_bytes_per_s / 1e9:.2f} GB/s, "
            f"{machine.op_seconds * 1e6:.1f} us per operator (per rank, measured while the machine was shared)")


def main(argv=None) -> Machine:
    p = argparse.ArgumentParser(prog="python -m recipe.microbench", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    machine = measure_machine(args.ranks, args.dtype, args.size, args.repeats)
    print(describe(machine))
    return machine


if __name__ == "__main__":
    main()
