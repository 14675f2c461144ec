"""Run several ``recipe.train`` jobs in one torchrun launch, counting each job's collective bytes per step.

    torchrun --nnodes 2 --nproc_per_node 2 ... tests/multinode_jobs.py OUT '[["ours", ["--shard", "ours"]], ...]' FLAGS...

Each job is ``recipe.train.main(FLAGS + its flags + ["--out", OUT/name])``: what ``python -m
recipe.train`` runs, in a process group that is already up (so a 2-core test machine pays torch's
import and the rendezvous once for all jobs). Around each job, ``sharding.count_collective_bytes`` is
open and ``on_step`` writes down the running totals after every step; rank r writes them to
``OUT/<i>-<name>.rank<r>.json`` (a list, one {"group/collective": bytes} per step), and rank 0 copies
the job's ``metrics.jsonl`` to ``OUT/<i>-<name>.metrics.jsonl`` (a later job may resume into the same
directory and rewrite it). Each job logs every step (``LoopConfig.log_every = 1``), so ``on_step`` runs
right after its step and the totals it writes are those of that step, not of a later one.
"""
import dataclasses
import gc
import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import torch.distributed as dist

import recipe.job
import sharding
from recipe.train import main

loop_train = recipe.job.train


def train_logging_every_step(run, config, *args):
    """``recipe.loop.train`` with ``log_every=1``: ``on_step`` after every step, not at the next log."""
    return loop_train(run, dataclasses.replace(config, log_every=1), *args)


def run_jobs(out: Path, jobs: list, flags: list[str]) -> None:
    for index, (name, extra) in enumerate(jobs):
        totals = []
        logging_every_step = mock.patch.object(recipe.job, "train", train_logging_every_step)
        with sharding.count_collective_bytes() as counted, logging_every_step:
            main([*flags, *extra, "--out", str(out / name)],
                 on_step=lambda record: totals.append({f"{g}/{c}": n for (g, c), n in counted.bytes.items()}))
        (out / f"{index}-{name}.rank{dist.get_rank()}.json").write_text(json.dumps(totals))
        if dist.get_rank() == 0:
            shutil.copyfile(out / name / "metrics.jsonl", out / f"{index}-{name}.metrics.jsonl")
        gc.collect()  # the sharded model's hooks hold reference cycles (see recipe.train.cli)
        dist.barrier()


if __name__ == "__main__":
    try:
        run_jobs(Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:])
    finally:
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
