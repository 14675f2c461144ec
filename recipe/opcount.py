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
    bytes       bytes read + written by the other operators, the memory-bound ones (``moved_bytes``: the
                sizes of their tensor inputs and outputs), neither a matmul, nor attention, nor inside NF4
                dequantization (priced by their own rates), nor a view or an allocation (which move none)

Phases: "data" until the first module's forward, "forward", "backward" (the autograd engine is running),
then "optimizer" (clipping, ``step``, ``zero_grad``). ``recipe.timemodel.step_dispatch`` is the formula
these counts are checked against (``tests/test_recipe_timemodel.py``).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

import nf4

PHASES = ("data", "forward", "backward", "optimizer")
# Python the dispatch mode itself runs per operator (its own frames, torch's rule lookup): not the step's
_OWN_FILES = {__file__, sys.modules[TorchDispatchMode.__module__].__file__, torch._compile.__file__,
              torch._library.simple_registry.__file__}
MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "addmv", "mv", "dot"}
MOVE_NOTHING = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                "_unsafe_view"}
_NF4_DIR = os.path.dirname(nf4.__file__) + os.sep


def moves_memory(func) -> bool:
    """Whether ``func`` is a memory-bound operator: not a matmul, attention, a view or an allocation."""
    name = func._overloadpacket.__name__
    return not (func.is_view or name in MATMULS or name in MOVE_NOTHING or "scaled_dot_product" in name)


def tensors(value):
    """The tensors in nested tuples, lists and dicts (here, not ``torch.utils._pytree``, whose Python calls
    would count as the step's)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v)
    elif isinstance(value, dict):
        yield from tensors(list(value.values()))


def _in_nf4() -> bool:
    """Whether the caller runs inside the nf4 package (its dequantization, priced at its own rate)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_NF4_DIR):
            return True
        frame = frame.f_back
    return False


class StepCounter(TorchDispatchMode):
    """``with StepCounter() as c: <one step>`` then ``c.counts[phase][kind]`` (kind: ops, python, callbacks,
    collectives, bytes), ``c.names[phase]`` (a Counter of operator names) and ``c.moved[phase]`` (bytes by
    operator name)."""

    def __init__(self):
        super().__init__()
        self.phase = "data"
        self.counts = {p: collections.Counter() for p in PHASES}
        self.names = {p: collections.Counter() for p in PHASES}
        self.moved = {p: collections.Counter() for p in PHASES}
        self.sizes = {p: collections.Counter() for p in PHASES}

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
        name = func._overloadpacket._qualified_op_name  # attributes, not properties: no Python calls of our own
        kind = "collectives" if name.startswith("c10d::") else "ops"
        self.counts[phase][kind] += 1
        self.names[phase][name] += 1
        out = func(*args, **(kwargs or {}))
        if kind == "ops" and moves_memory(func) and not _in_nf4():
            for t in tensors((args, kwargs, out)):
                moved = t.numel() * t.element_size()
                self.counts[phase]["bytes"] += moved
                self.moved[phase][name] += moved
                self.sizes[phase][t.numel()] += moved
        return out

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
    """The counts of one step on one rank: {phase: {"ops", "python", "callbacks", "collectives", "bytes"}},
    the bytes by operator name per phase, and the totals."""
    phases: dict
    moved: dict = dataclasses.field(default_factory=dict)
    sizes: dict = dataclasses.field(default_factory=dict)

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
    return Counted(*({p: dict(table[p]) for p in PHASES} for table in (counter.counts, counter.moved, counter.sizes)))


def bytes_by_width(counted: Counted, shape, batch_size: int, seq_len: int) -> dict[str, dict[str, int]]:
    """Each phase's memory-bound bytes split by the width of the tensors that moved them: "intermediate"
    (b s x intermediate_size elements: the MLP's), "vocab" (b s x vocab or the shifted b (s - 1) x vocab:
    the logits') and "hidden" (all the rest: hidden-, KV- and LoRA-width activations, norms' statistics,
    masks, LoRA gradients), the split ``recipe.timemodel.ELEMENTWISE`` is written in."""
    tokens = batch_size * seq_len
    width = {tokens * shape.intermediate_size: "intermediate", tokens * shape.vocab_size: "vocab",
             batch_size * (seq_len - 1) * shape.vocab_size: "vocab"}
    split = {}
    for phase, sizes in counted.sizes.items():
        split[phase] = collections.Counter()
        for numel, moved in sizes.items():
            split[phase][width.get(numel, "hidden")] += moved
    return {p: dict(v) for p, v in split.items()}


def default_job(**flags):
    """The main job's ``JobConfig`` with ``recipe.train``'s defaults (and ``flags`` as command-line words)."""
    from .train import job_config, parse_args

    argv = [word for key, value in flags.items() for word in (f"--{key.replace('_', '-')}", str(value))]
    return job_config(parse_args([*argv, "--no-progress", "--samples", "0"]))


def main() -> Counted:
    import tempfile

    import torch.distributed as dist

    import llama

    torch.set_num_threads(1)  # the formula's condition: one torch thread per rank
    store = tempfile.NamedTemporaryFile(prefix="home70b-opcount-", delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        config = default_job(out=tempfile.mkdtemp(prefix="home70b-opcount-"))
        counted = count_step(config)
    finally:
        dist.destroy_process_group()
        os.unlink(store)
    split = bytes_by_width(counted, llama.LlamaConfig.from_hf(config.build.model), config.batch_size, config.seq_len)
    for phase in PHASES:
        print(f"{phase:<10}", ", ".join(f"{k} {v}" for k, v in sorted(counted.phases[phase].items())),
              "| bytes by width:", ", ".join(f"{k} {v}" for k, v in sorted(split[phase].items())))
    return counted


if __name__ == "__main__":
    main()
