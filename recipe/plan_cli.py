"""``python -m recipe.plan``: the memory plan, and on request the step time and the sharding comparison.

    python -m recipe.plan llama-2-70b --world-size 2 --batch-size 2 --seq-len 2048 --offload --gpu rtx3090
    python -m recipe.plan llama-2-7b --cpu                      # time on this machine (measured rates)
    python -m recipe.plan llama/assets/tiny-llama --world-size 1 --batch-size 4 --seq-len 256 --rank 8 \
        --no-activation-checkpointing --cpu --packed          # the main job's step (packed rows: a mask)
    python -m recipe.plan llama-2-70b --published               # predicted vs the reference's 70B runs
    python -m recipe.plan llama-2-70b --nodes 2 --gpus-per-node 8 --intra-gbs 300 --inter-gbs 25

A user error (unknown preset, bad flag value) is one line ``error: ...`` on stderr and exit status 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses

from llama.cli import Parser, integer, number, run_command

from .plan import ALL_LINEAR, GiB, Plan, Setup, plan


def parse_args(argv=None) -> argparse.Namespace:
    from .timemodel import GPUS

    p = Parser(prog="python -m recipe.plan", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="llama-2-70b", help="preset name, config.json or checkpoint dir")
    p.add_argument("--world-size", type=integer(minimum=1), default=2)
    p.add_argument("--gpu-gib", type=number(above=0), default=24.0, help="memory budget per rank")
    p.add_argument("--batch-size", type=integer(minimum=1), default=2)
    p.add_argument("--seq-len", type=integer(minimum=1), default=2048)
    p.add_argument("--rank", type=integer(minimum=1), default=64)
    p.add_argument("--target-modules", default=",".join(ALL_LINEAR))
    p.add_argument("--dora", action="store_true")
    p.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--no-quant", dest="quantize", action="store_false")
    p.add_argument("--fp32", action="store_true", help="compute in fp32 (4 bytes) instead of bf16")
    p.add_argument("--gpu", choices=sorted(GPUS), help="predict the step time on this GPU (datasheet rates)")
    p.add_argument("--cpu", action="store_true", help="predict the step time on this machine (measured rates)")
    p.add_argument("--packed", action="store_true", help="time model: the batches carry an explicit attention mask "
                   "(packed rows, as the main job's instruction data), so SDPA computes the whole square")
    p.add_argument("--published", action="store_true", help="predicted vs published s/step of the reference 70B runs (their setup, not these flags)")
    p.add_argument("--nodes", type=integer(minimum=1), default=None, help="compare full vs hybrid sharding on N nodes")
    p.add_argument("--gpus-per-node", type=integer(minimum=1), default=None)
    p.add_argument("--intra-gbs", type=number(above=0), default=25.0, help="GB/s between GPUs of a node")
    p.add_argument("--inter-gbs", type=number(above=0), default=12.5, help="GB/s of a node's network link")
    return p.parse_args(argv)


def run(args) -> Plan:
    from .links import Interconnect, compare_strategies
    from .timemodel import GPUS, published_check, time_table

    setup = Setup(world_size=args.world_size, gpu_bytes=int(args.gpu_gib * GiB), batch_size=args.batch_size,
                  seq_len=args.seq_len, rank=args.rank, target_modules=tuple(args.target_modules.split(",")),
                  dora=args.dora, activation_checkpointing=args.activation_checkpointing, offload=args.offload,
                  quantize=args.quantize, compute_bytes=4 if args.fp32 else 2)
    result = plan(args.config, setup)
    print(result.table())
    if args.gpu:
        print(time_table(result.shape, setup, GPUS[args.gpu], args.packed))
    if args.cpu:
        from .microbench import describe, measure_machine
        from .timemodel import workload_of

        cpu_setup = dataclasses.replace(setup, device="cpu")  # the CPU's nf4 path (chunked dequantization)
        machine = measure_machine(workload_of(result.shape, cpu_setup, args.packed), ranks=args.world_size,
                                  dtype="float32" if args.fp32 else "bfloat16")
        print(describe(machine))
        print(time_table(result.shape, cpu_setup, machine, args.packed))
    if args.published:
        print(published_check())
    if args.nodes is not None or args.gpus_per_node is not None:
        nodes, per_node = args.nodes or 1, args.gpus_per_node or args.world_size
        print(compare_strategies(result.shape, setup, nodes, per_node, Interconnect(args.intra_gbs, args.inter_gbs)))
    return result


def main(argv=None) -> Plan:
    """The plan of ``argv``; a user error is one ``error:`` line and exit status 2 (``llama.cli``)."""
    return run_command(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
