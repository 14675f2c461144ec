"""What one training step dispatches, counted: the fixed per-call costs behind ``recipe.timemodel``'s overhead.

    python -m recipe.opcount                    # the main job's defaults on the bundled tiny-llama, 1 rank

``count_step`` runs real steps of the main job (``recipe.loop.train_step``, the data, build and optimizer of
``recipe.job``) on this rank and counts, per phase of the last one:

    ops         ATen operators dispatched (a ``TorchDispatchMode`` sees each one, forward and backward,
                whoever calls it: Python, an autograd Function or the autograd engine)
    python      Python function calls (``sys.setprofile``'s call events; the interpreter's cost per call)
    callbacks   of those, the calls from C++ into Python: a custom autograd Function's ``forward`` (from ``apply``) and
                every Python function the autograd engine calls (Function backwards, tensor and grad_fn
                hooks, the sharder's multi-grad and post-accumulate hooks), counted with ``sys.setprofile``
    collectives c10d collectives (all-gather, reduce-scatter, all-reduce), seen by the same dispatch mode

Phases: "data" until the first module's forward, "forward", "backward" (the autograd engine is running),
then "optimizer" (clipping, ``step``, ``zero_grad``). ``recipe.timemodel.step_dispatch`` is the formula
these counts are checked against (``tests/test_recipe_timemodel.py``).
"""
from __future__ import annotations

import collections
import dataclasses
import sys

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("data", "forward", "backward", "optimizer")
# Python the dispatch mode itself runs per operator (its own frames, torch's rule lookup): not the step's
_OWN_FILES = {__file__, sys.modules[TorchDispatchMode.__module__].__file__, torch._compile.__file__,
              torch._library.simple_registry.__file__}


class StepCounter(TorchDispatchMode):
    """``with StepCounter() as c: <one step>`` then ``c.counts[phase][kind]`` (kind: ops, python, callbacks,
    collectives) and ``c.names[phase]`` (a Counter of operator names)."""

    def __init__(self):
        super().__init__()
        self.phase = "data"
        self.counts = {p: collections.Counter() for p in PHASES}
        self.names = {p: collections.Counter() for p in PHASES}

    def _now(self) -> str:
        if torch._C._current_graph_task_id() != -1:
            self.phase = "backward"
        elif self.phase == "backward":
            self.phase = "optimizer"
        return self.phase

    def _forward_started(self, module, args) -> None:
        if self.phase == "data" and torch.is_grad_enabled():
            self.phase = "forward"

    def _profile(self, frame, event, arg) -> None:
        if event != "call" or frame.f_back is None or frame.f_code.co_filename in _OWN_FILES:
            return
        self.counts[self._now()]["python"] += 1
        caller = frame.f_back.f_code
        from_cpp = (caller.co_name == "apply" and caller.co_filename.endswith("autograd/function.py")
                    and frame.f_code.co_name == "forward") or caller.co_name == "_engine_run_backward"
        if from_cpp:
            self.counts[self._now()]["callbacks"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase = self._now()
        kind = "collectives" if func.namespace == "c10d" else "ops"
        self.counts[phase][kind] += 1
        self.names[phase][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._hook = register_module_forward_pre_hook(self._forward_started)
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        self._hook.remove()
        return super().__exit__(*exc)


@dataclasses.dataclass(frozen=True)
class Counted:
    """The counts of one step on one rank: {phase: {"ops", "callbacks", "collectives"}} and the totals."""
    phases: dict

    def total(self, kind: str) -> int:
        return sum(self.phases[p].get(kind, 0) for p in PHASES)


def count_step(config, steps: int = 2) -> Counted:
    """Build ``config`` (a ``recipe.job.JobConfig``) on this rank's process group, run ``steps`` steps and
    count the last one (the first ones allocate workspaces and state once)."""
    import llama

    from .build import build
    from .corpus import load_corpus
    from .job import enable_activation_checkpointing, prepare_run
    from .loop import train_step

    model_config = llama.LlamaConfig.from_hf(config.build.model)
    corpus = load_corpus(config, model_config, torch.distributed.get_world_size())
    built = build(config.build)
    if config.activation_checkpointing:
        enable_activation_checkpointing(built.model.model.layers)
    run = prepare_run(config, built, corpus, model_config)
    for step in range(steps - 1):
        train_step(run, config.loop, step)
    with StepCounter() as counter:
        train_step(run, config.loop, steps - 1)
    return Counted({p: dict(counter.counts[p]) for p in PHASES})


def default_job(**flags):
    """The main job's ``JobConfig`` with ``recipe.train``'s defaults (and ``flags`` as command-line words)."""
    from .train import job_config, parse_args

    argv = [word for key, value in flags.items() for word in (f"--{key.replace('_', '-')}", str(value))]
    return job_config(parse_args([*argv, "--no-progress", "--samples", "0"]))


def main() -> Counted:
    import os
    import tempfile

    import torch.distributed as dist

    store = tempfile.NamedTemporaryFile(prefix="home70b-opcount-", delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        counted = count_step(default_job(out=tempfile.mkdtemp(prefix="home70b-opcount-")))
    finally:
        dist.destroy_process_group()
        os.unlink(store)
    for phase in PHASES:
        print(f"{phase:<10}", ", ".join(f"{k} {v}" for k, v in sorted(counted.phases[phase].items())))
    return counted


if __name__ == "__main__":
    main()
