"""Side-by-side benchmarks, ours vs the library, one table each; each has ``--quick`` (tiny sizes, seconds).

Run them as modules from the repository root (``python -m benchmarks.nf4``, ``torchrun --nproc_per_node 2
-m benchmarks.sharding``), and start any worker process as a module too (``-m benchmarks.e2e_library``):
as a plain script, ``benchmarks/nf4.py`` would put ``benchmarks/`` first on ``sys.path`` and shadow the
``nf4`` package it measures."""
import time

import torch


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes on ``device``: on a GPU, queued work is waited for before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
