"""This machine's rates for the step-time model (``recipe.timemodel.Machine``), measured per rank.

    python -m recipe.microbench --ranks 2 --dtype bfloat16

``ranks`` gloo processes run each measurement at the same time, as training ranks share the cores, at
the shapes of one step (``recipe.timemodel.Workload``): matmul FLOP/s over the step's linear shapes
[tokens, in] x [in, out] in the compute dtype; the LoRA adapters' FLOP/s, forward and backward, at
the step's (tokens, in, out, r); attention FLOP/s of SDPA forward + backward at the step's
(batch, heads, seq, head_dim); copy bandwidth (bytes read + written by ``copy_`` of a 64 MiB tensor); NF4
dequantization (codes and absmax read + values written per second); the bandwidth of the step's
elementwise operators (a norm, a residual add and a SwiGLU product at the step's activation size, in the
compute dtype, bytes as ``recipe.opcount`` counts them); all-gather bandwidth over gloo
(payload per second of a 16 MiB ``all_gather_into_tensor``); and the fixed costs the step pays per call:
one tiny ATen operator, one C++-to-Python callback (a custom autograd Function's forward or backward, a
hook) and one collective's latency (a 1-element all-gather). Each is the median of a few repeats. Numbers
measured on a machine shared with other work move with its load; the model is only as good as these.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llama.cli import Parser, integer, run_command

from .timemodel import Machine, Workload, workload_of


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name newer torch prefers


def _median_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return max(statistics.median(times), 1e-9)  # a CPU clock may see no time at all for a blocking wait


def _matmul_flops(linears, dtype: torch.dtype, repeats: int, clock) -> float:
    """FLOP/s of ``x @ w`` over the step's linear shapes (tokens, in, out), each dimension capped at 2048."""
    flops = seconds = 0.0
    for tokens, i, o in sorted(set(linears)):
        m, k, n = (min(d, 2048) for d in (tokens, i, o))
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        flops, seconds = flops + 2 * m * k * n, seconds + _median_seconds(lambda: a @ b, repeats, clock)
    return flops / seconds


def _adapter_flops(adapters, dtype: torch.dtype, repeats: int, clock) -> float:
    """FLOP/s of the LoRA adapters of one decoder layer as ``lora.LoRALinear`` runs them, forward and backward
    (x A^T, then addmm onto the base output with B^T; the input and both weight gradients: 6 t r (in + out)
    FLOPs per adapter), at the step's (tokens, in, out, r), tokens capped at 2048: thin matmuls, far below
    the large ones' rate on a CPU."""
    total, steps = 0.0, []
    for tokens, i, o, r in adapters:
        t = min(tokens, 2048)
        x = torch.randn(t, i, dtype=dtype, requires_grad=True)
        a, b = (torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in ((r, i), (o, r)))
        base, grad = torch.randn(t, o, dtype=dtype), torch.ones(t, o, dtype=dtype)
        steps.append(lambda x=x, a=a, b=b, base=base, grad=grad: torch.addmm(
            base, torch.nn.functional.linear(x, a), b.t(), alpha=2.0).backward(grad))
        total += 6 * t * r * (i + o)
    return total / _median_seconds(lambda: [step() for step in steps], repeats, clock) if steps else float("inf")


def _attention_flops(attention, dtype: torch.dtype, repeats: int, clock) -> float:
    """FLOP/s of SDPA forward + backward at the step's (batch, heads, seq, head_dim), as the model calls it
    on the CPU in training (K/V repeated to every head; an explicit bool mask when ``masked``, which makes
    it compute the whole seq x seq square: 12 s^2 d FLOPs per head and row, 6 with ``is_causal``), on as
    many (row, head) pairs as keep one repeat under ~2 GFLOP."""
    batch, heads, seq, head_dim, masked = attention
    per_head = (12 if masked else 6) * seq * seq * head_dim
    pairs = max(1, min(batch * heads, int(2e9 // per_head)))
    q, k, v = (torch.randn(1, pairs, seq, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] if masked else None

    def step():
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked)
        y.backward(torch.ones_like(y))
    return pairs * per_head / _median_seconds(step, repeats, clock)


def _elementwise_mix(x, y, g, u):
    """A decoder layer's memory-bound operators at its activation size, as the step runs them most (mul, add,
    casts, pow, mean, silu; ``recipe.opcount``'s top operators by bytes): RMSNorm in fp32 with a residual
    add, and the SwiGLU product."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    return normed * y + x, torch.nn.functional.silu(g) * u


def _elementwise_bytes_per_s(activations, dtype: torch.dtype, repeats: int, clock) -> float:
    """Bytes/s of ``_elementwise_mix`` (5 in a row per repeat) on (tokens, hidden) and (tokens, intermediate)
    tensors of ``dtype``, its bytes counted as ``recipe.opcount`` counts the step's (every operator's inputs
    and outputs)."""
    from .opcount import StepCounter

    tokens, hidden, intermediate = activations
    x, y = torch.randn(2, tokens, hidden, dtype=dtype)
    g, u = torch.randn(2, tokens, intermediate, dtype=dtype)
    with torch.no_grad():
        with StepCounter() as counter:
            _elementwise_mix(x, y, g, u)
        return 5 * counter.counts["data"]["bytes"] / _median_seconds(
            lambda: [_elementwise_mix(x, y, g, u) for _ in range(5)], repeats, clock)


class _Identity(torch.autograd.Function):
    """The cheapest custom autograd Function: its forward and backward cost what crossing into Python costs."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _python_frames(fn) -> int:
    """Python function calls made by ``fn()`` (``sys.setprofile``'s call events)."""
    frames = 0

    def count(frame, event, arg):
        nonlocal frames
        frames += event == "call"
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return frames - 1  # less the call of fn itself


def _fixed_costs(repeats: int, clock, calls: int = 500) -> dict[str, float]:
    """Seconds per tiny ATen operator as a training step runs them (an ``add`` of two 1-element tensors that
    autograd records, and its node in the backward: a chain of them, forward then backward, over twice its
    length), per Python function call (a call of an ``nn.Identity`` module over the Python frames it runs),
    per C++-to-Python callback (half a round trip of ``_Identity``: its forward from ``apply`` and its
    backward from the autograd engine, less the two operators inside) and per collective (an all-gather of
    one element over the process group)."""
    one = torch.ones(1)

    def recorded_ops():
        y = torch.ones(1, requires_grad=True)
        for _ in range(calls):
            y = y.add(one)
        y.backward()
    op = _median_seconds(recorded_ops, repeats, clock) / calls / 2
    module = torch.nn.Identity()
    frames = _python_frames(lambda: module(one))
    python = _median_seconds(lambda: [module(one) for _ in range(calls)], repeats, clock) / calls / max(1, frames)

    def round_trips():
        x = torch.ones(1, requires_grad=True)
        y = x
        for _ in range(calls):
            y = _Identity.apply(y)
        y.backward()
    callback = max(op, _median_seconds(round_trips, repeats, clock) / calls / 2 - op)
    world = dist.get_world_size()
    tiny, gathered = torch.ones(1), torch.empty(world)
    dist.barrier()
    collective = _median_seconds(lambda: [_ALL_GATHER(gathered, tiny) for _ in range(20)], repeats, clock) / 20
    return {"op_seconds": op, "python_seconds": python, "callback_seconds": callback, "collective_seconds": collective}


def measure_rates(dtype: torch.dtype, workload: Workload, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """The rates of this process (see the module doc) at the shapes of ``workload``, timed by ``clock``: wall
    time (``time.perf_counter``), or ``time.process_time`` for the CPU time this process spends (all its
    threads), which does not count the time other work on the machine takes from it."""
    import nf4

    src = torch.empty(16 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = 2 * src.nbytes / _median_seconds(lambda: dst.copy_(src), repeats, clock)
    tokens, i, o = max(workload.linears, key=lambda shape: shape[1] * shape[2])
    qw = nf4.quantize(torch.randn(min(o, 2048), min(i, 2048)))
    stored = qw.packed.nbytes + qw.numel / 64  # codes + 8-bit absmax
    dequant = (stored + qw.numel * dtype.itemsize) / _median_seconds(lambda: nf4.dequantize(qw, dtype), repeats, clock)
    world = dist.get_world_size()
    shard = torch.ones(4 * 2**20 // world, dtype=torch.float32)
    full = torch.empty(shard.numel() * world)
    dist.barrier()
    gather = full.nbytes / _median_seconds(lambda: _ALL_GATHER(full, shard), repeats, clock)
    return {"matmul_flops": _matmul_flops(workload.linears, dtype, repeats, clock),
            "adapter_flops": _adapter_flops(workload.adapters, dtype, repeats, clock),
            "attention_flops": _attention_flops(workload.attention, dtype, repeats, clock),
            "copy_bytes_per_s": copy, "dequantize_bytes_per_s": dequant, "gather_bytes_per_s": gather,
            "elementwise_bytes_per_s": _elementwise_bytes_per_s(workload.activations, dtype, repeats, clock),
            **_fixed_costs(repeats, clock)}


def _rank(rank: int, world: int, store: str, dtype: str, workload: Workload, repeats: int, threads: int, out) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rates = measure_rates(getattr(torch, dtype), workload, repeats)
    gathered = [None] * world
    dist.all_gather_object(gathered, rates)
    if rank == 0:
        out.put({k: statistics.median(r[k] for r in gathered) for k in rates})
    dist.destroy_process_group()


def measure_machine(workload: Workload, ranks: int = 2, dtype: str = "bfloat16", repeats: int = 5,
                    threads: int | None = None) -> Machine:
    """Spawn ``ranks`` gloo processes of ``threads`` torch threads each (default: the cores shared out, as
    ``torchrun`` does), measure at ``workload``'s shapes, return the median rank's rates as a ``Machine``."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a recipe.timemodel.Workload, got {type(workload).__name__}")
    if ranks < 1 or repeats < 1:
        raise ValueError(f"need ranks >= 1 and repeats >= 1; got ranks={ranks}, repeats={repeats}")
    threads = threads or max(1, (os.cpu_count() or 1) // ranks)
    queue = mp.get_context("spawn").SimpleQueue()
    store = tempfile.NamedTemporaryFile(prefix="home70b-bench-", delete=False).name
    try:
        mp.spawn(_rank, args=(ranks, store, dtype, workload, repeats, threads, queue), nprocs=ranks)
        rates = queue.get()
    finally:
        if os.path.exists(store):
            os.unlink(store)
    return Machine(name=f"this CPU ({ranks} ranks x {threads} threads, {dtype})", host_link_bytes_per_s=None,
                   source="measured by recipe.microbench", **rates)


def describe(machine: Machine) -> str:
    return (f"{machine.name}: matmul {machine.matmul_flops / 1e9:.1f} GFLOP/s, LoRA adapters "
            f"{(machine.adapter_flops or machine.matmul_flops) / 1e9:.1f} GFLOP/s, attention {machine.attention_flops / 1e9:.1f} "
            f"GFLOP/s, copy {machine.copy_bytes_per_s / 1e9:.2f} GB/s, NF4 dequantize {machine.dequantize_bytes_per_s / 1e9:.2f} "
            f"GB/s, elementwise {machine.elementwise_bytes_per_s / 1e9:.2f} GB/s, all-gather {machine.gather_bytes_per_s / 1e9:.2f} GB/s; {machine.op_seconds * 1e6:.1f} us per operator, "
            f"{machine.python_seconds * 1e6:.2f} us per Python call, "
            f"{machine.callback_seconds * 1e6:.1f} us per callback, {machine.collective_seconds * 1e6:.0f} us per collective "
            f"(per rank, measured while the machine was shared)")


def main(argv=None) -> Machine:
    from llama.pretrain import BUNDLED_MODEL

    from .plan import Setup

    p = Parser(prog="python -m recipe.microbench", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=integer(minimum=1), default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--repeats", type=integer(minimum=1), default=5)
    args = p.parse_args(argv)
    setup = Setup(world_size=args.ranks, batch_size=4, seq_len=256, rank=8, activation_checkpointing=False)
    machine = measure_machine(workload_of(BUNDLED_MODEL, setup, masked=True), args.ranks, args.dtype, args.repeats)
    print(describe(machine))
    return machine


if __name__ == "__main__":
    run_command(main)
