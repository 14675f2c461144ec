"""Run a function in N real processes joined by a torch.distributed process group (gloo, CPU).

    from distributed import run_on_ranks
    results = run_on_ranks(check_something, world_size=2, args=(7,))   # [rank 0's result, rank 1's]

``fn(rank, world_size, *args)`` must be importable by name (a module-level function) because the
children are *spawned* (a fresh interpreter each, like torchrun). Each child initializes the default
process group on a free localhost port, sets one intra-op thread (the CI machine has two cores), runs
``fn`` and sends back its return value (anything picklable; tensors are fine). If any rank raises, the
others are stopped and a RuntimeError carries that rank's traceback; if the ranks stop answering
(a hang in a collective), a TimeoutError is raised instead of hanging the test run.

Spawning costs a second or two per process (importing torch): run several checks in one job.
"""
import multiprocessing
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn, rank, world_size, port, args, backend, results, timeout_s):
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report everything, assertion errors included, before the group goes away
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # delivered before the peers can notice this rank leaving
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, args: tuple = (), backend: str = "gloo", timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_child, args=(fn, rank, world_size, port, args, backend, results, timeout_s),
                                 daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    values, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died without reporting (exit code {dead[0].exitcode})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout_s} s")
                continue
            if status == "error":  # the first failure is the cause; others (peers losing it) follow
                raise RuntimeError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{payload}")
            values[rank] = pickle.loads(payload)
    finally:
        for process in processes:
            process.join(timeout=5.0 if len(values) == world_size else 0.5)
            if process.is_alive():
                process.kill()  # only the ranks this call started
                process.join()
    return [values[rank] for rank in range(world_size)]
