"""Measured memory per planner component and per phase of a training step (what ``recipe.measure`` reports).

``PhaseMemory`` is ``recipe.memory.TensorMemory`` (live bytes of tensor storage, the CPU analog of
``torch.cuda.max_memory_allocated``) that also files every storage under one of the planner's
components when it is created, and keeps, for each phase of the step, the peak and how it split:

    phase       forward (training forward, the loss included); backward (autograd's engine running:
                torch._C._current_graph_task_id() != -1), split in "backward (loss)" while a
                vocabulary-sized tensor is alive (cross-entropy's and lm_head's backward) and
                "backward (layers)" after it; optimizer (inside ``Optimizer.step``)
    component   persistent          created while building the model or in the optimizer step (shards,
                                    fp32 LoRA masters, AdamW moments)
                gathered units      a storage the sharder resizes (its all-gathered flat buffers)
                dequantized weight  a 1-D storage of a frozen linear's size (o * i) or its absmax count
                                    (o * i / 64), or a 1-D integer one (the CPU path's per-chunk
                                    scratch), forward or backward; on the CPU this includes nf4's
                                    reused dense-weight workspace, made at the first forward (the
                                    held-out loss before training) and live in every phase after
                logits + loss       a tensor whose last dimension is the vocabulary
                activations         any other storage created in forward (kept for backward or not)
                recompute           created in backward while a module's forward runs or a checkpointed
                                    layer is recomputed
                backward            any other storage created in backward (gradients flowing, LoRA grads)

The split is by where and when a storage is made, not by what the planner predicts, so comparing the
two checks the planner's model of what is live together at the peak. A dispatch mode sees only its own
thread: with several torch threads, nf4's CPU dequantize scratch in its worker threads is not counted.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from torch.utils._pytree import tree_flatten

from llama.cli import run_command

from .files import write_text_atomically
from .memory import TensorMemory

COMPONENTS = ("persistent", "gathered units", "dequantized weight", "activations", "recompute", "backward",
              "logits + loss")
PHASES = ("forward", "backward (loss)", "backward (layers)", "optimizer")


class PhaseMemory(TensorMemory):
    """``with PhaseMemory(vocab, weight_numels) as mem: <build, train>`` then ``mem.phase_peaks``:
    {phase: {"total": bytes, component: bytes, ...}} at each phase's own peak since ``reset_peak``."""

    LISTED = 8 * 2**20
    BIG = 64 * 2**10  # re-measure storages from 64 KiB: a tiny model's gathered layers are below 1 MiB

    def __init__(self, vocab_size: int, weight_numels):
        super().__init__(record_peak=False)
        self.vocab_size, self.weight_numels = vocab_size, set(weight_numels)
        self.component: dict[int, str] = {}            # id(storage) -> component (not the gathered ones)
        self._gathered: set[int] = set()                # the storages the sharder resizes
        self._new: list[int] = []                       # storages the current op created
        self.by_component = dict.fromkeys(COMPONENTS, 0)
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self.phase_big: dict[str, list] = {}             # phase -> (bytes, op, component) of storages >= LISTED
        self._trained = self._in_optimizer = False
        self._module_depth = 0
        self._hooks = []

    # ------------------------------------------------------------------ phase tracking
    def __enter__(self):
        def pre(*_):
            self._module_depth += 1
            self._trained = self._trained or torch.is_grad_enabled()

        def post(*_):
            self._module_depth -= 1

        def opt(flag):
            return lambda *_: setattr(self, "_in_optimizer", flag)

        # always_call: a checkpointed layer's recompute stops early by raising out of its modules' forwards
        self._hooks = [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True),
                       register_optimizer_step_pre_hook(opt(True)), register_optimizer_step_post_hook(opt(False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def phase(self) -> str:
        if self._in_optimizer:
            return "optimizer"
        if torch._C._current_graph_task_id() != -1:
            return "backward (loss)" if self.by_component["logits + loss"] else "backward (layers)"
        # a forward before training (the held-out loss) is a forward too: nf4's CPU workspace for the
        # dequantized weight is allocated there once and reused by every later forward and backward
        return "forward" if self._trained or self._module_depth > 0 else "build"

    def _classify(self, tensor: torch.Tensor) -> str:
        phase = self.phase()
        if phase in ("build", "optimizer"):
            return "persistent"
        if tensor.dim() >= 1 and tensor.shape[-1] == self.vocab_size:
            return "logits + loss"
        if tensor.dim() == 1 and (tensor.numel() in self.weight_numels or not tensor.is_floating_point()):
            return "dequantized weight"  # the weight (or CPU workspace), its fp32 absmax, the CPU path's scratch
        if phase.startswith("backward"):
            return "recompute" if self._module_depth > 0 or recomputing() else "backward"
        return "activations"

    # ------------------------------------------------------------------ TensorMemory's bookkeeping, per component
    def reset_peak(self) -> None:
        super().reset_peak()
        self.phase_peaks, self.phase_big = {}, {}

    def _set_peak(self) -> None:
        super()._set_peak()
        if not self._new:  # else after the op's new storages are filed (__torch_dispatch__)
            self._set_phase_peak()

    def _set_phase_peak(self) -> None:
        phase = self.phase()
        if phase in PHASES and self.current > self.phase_peaks.get(phase, {}).get("total", -1):
            gathered = sum(self._live[key][0] for key in self._gathered)
            self.phase_peaks[phase] = {"total": self.current, **self.by_component, "gathered units": gathered}
            self.phase_big[phase] = sorted(((n, op, "gathered units" if key in self._gathered else self.component[key])
                                            for key, (n, op) in self._live.items() if n >= self.LISTED), reverse=True)

    def _remeasure_big(self) -> None:
        for key, ref in list(self._big.items()):  # a storage whose size changed without an op: the sharder's
            storage = ref()
            if storage is not None and storage.nbytes() != self._live[key][0] and key not in self._gathered:
                self.by_component[self.component.pop(key)] -= self._live[key][0]
                self._gathered.add(key)
        super()._remeasure_big()

    def _count(self, storage: torch.UntypedStorage, op: str) -> None:
        known = id(storage) in self._live
        super()._count(storage, op)
        if not known and id(storage) in self._live:
            self._new.append(id(storage))

    def _release(self, key: int) -> None:
        if key in self._gathered:
            self._gathered.discard(key)
        elif key in self.component:
            self.by_component[self.component.pop(key)] -= self._live[key][0]
        super()._release(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._new = []
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self._new:
            made = {}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    made.setdefault(id(t.untyped_storage()), t)
            for key in self._new:
                component = self._classify(made[key]) if key in made else "activations"
                self.component[key] = component
                self.by_component[component] += self._live[key][0]
            self._new = []
            self._set_phase_peak()
        return out


def recomputing() -> bool:
    """Whether ``torch.utils.checkpoint`` (non-reentrant) is recomputing a forward: its recomputation
    saved-tensor hooks are the innermost ones. It calls the checkpointed layer's own ``forward``
    without that module's hooks, so module depth alone would miss the ops of the layer's body (the
    residual sums). Reads torch's private hook stack (``torch._C._autograd``)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return top is not None and "_recomputation_hook" in getattr(top[0], "__qualname__", "")


def train_with_phase_memory(argv) -> dict:
    """``recipe.train`` with ``--track-memory`` counting by ``PhaseMemory``; writes each rank's phase peaks
    to ``<out>/phase_peaks_rank<r>.json`` and returns them."""
    import torch.distributed as dist

    import llama

    from . import train
    from .device import init_distributed, resolve_device
    from .job import run_job
    from .plan import linear_shapes

    args = train.parse_args(argv)
    config = llama.LlamaConfig.from_hf(args.model)
    sizes = [o * i for o, i in linear_shapes(config).values()]
    tracker = PhaseMemory(config.vocab_size, sizes + [n // 64 for n in sizes])
    device = resolve_device(args.device)
    init_distributed(device)
    run_job(train.job_config(args, device), memory=tracker)
    peaks = {phase: {**parts, "storages": tracker.phase_big[phase]} for phase, parts in tracker.phase_peaks.items()}
    write_text_atomically(Path(args.out, f"phase_peaks_rank{dist.get_rank()}.json"), json.dumps(peaks, indent=1) + "\n")
    return peaks


if __name__ == "__main__":
    run_command(train_with_phase_memory)
