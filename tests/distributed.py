"""Run a function in N real processes joined by a torch.distributed process group (gloo, CPU).

    from distributed import run_on_ranks
    results = run_on_ranks(check_something, world_size=2, args=(7,))   # [rank 0's result, rank 1's]

``fn(rank, world_size, *args)`` must be importable by name (a module-level function) because the
children are *spawned* (a fresh interpreter each, like torchrun). Each child initializes the default
process group on a free localhost port, sets one intra-op thread (the CI machine has two cores), runs
``fn`` and sends back its return value (anything picklable; tensors are fine). If any rank raises, the
others are stopped and a RuntimeError carries that rank's traceback; if the ranks stop answering
(a hang in a collective), a TimeoutError is raised instead of hanging the test run.

Spawning costs a second or two per process (importing torch): run several checks in one job, and
start independent jobs together with ``start_on_ranks`` (each returns a job; ``job.results()`` waits).
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


class RankJob:
    """Ranks started by ``start_on_ranks``; ``results()`` waits for them (several jobs can run at once)."""

    def __init__(self, fn, world_size, args, backend, timeout_s):
        context = multiprocessing.get_context("spawn")
        self.fn, self.world_size, self.timeout_s = fn, world_size, timeout_s
        self.queue, port = context.Queue(), free_port()
        self.processes = [context.Process(target=_child, daemon=True, args=(
            fn, rank, world_size, port, args, backend, self.queue, timeout_s)) for rank in range(world_size)]
        for process in self.processes:
            process.start()
        self.deadline = time.monotonic() + timeout_s

    def results(self) -> list:
        values = {}
        try:
            while len(values) < self.world_size:
                try:
                    rank, status, payload = self.queue.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in self.processes if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a rank died without reporting (exit code {dead[0].exitcode})")
                    if time.monotonic() > self.deadline:
                        raise TimeoutError(f"{self.fn.__name__} on {self.world_size} ranks did not finish "
                                           f"in {self.timeout_s} s")
                    continue
                if status == "error":  # the first failure is the cause; others (peers losing it) follow
                    raise RuntimeError(f"rank {rank} of {self.world_size} failed in {self.fn.__name__}:\n{payload}")
                values[rank] = pickle.loads(payload)
        finally:
            for process in self.processes:
                process.join(timeout=5.0 if len(values) == self.world_size else 0.5)
                if process.is_alive():
                    process.kill()  # only the ranks this job started
                    process.join()
        return [values[rank] for rank in range(self.world_size)]


def start_on_ranks(fn, world_size: int, args: tuple = (), backend: str = "gloo", timeout_s: float = 120.0) -> RankJob:
    """Start ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks and return at once."""
    return RankJob(fn, world_size, args, backend, timeout_s)


def run_on_ranks(fn, world_size: int, args: tuple = (), backend: str = "gloo", timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank."""
    return start_on_ranks(fn, world_size, args, backend, timeout_s).results()
