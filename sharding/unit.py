"""One sharded unit (e.g. a decoder layer) and the four moments of its life in a training step.

    pre-forward   (module forward pre-hook)   all-gather the unit, point its tensors at the views,
                                              prefetch the next unit's all-gather (async)
    post-forward  (module forward hook)       free the gathered buffers (reshard_after_forward);
                                              hook the outputs' gradients to catch the pre-backward
    pre-backward  (multi-grad hook, "any")    the first gradient reached the unit's outputs: all-gather
                                              again (backward reads the saved views, or the module's
                                              attributes: point them at the views again), prefetch the
                                              nearest unit before it in forward whose backward will run
    post-backward (autograd Function wrapped  every gradient w.r.t. the unit's inputs exists, so its
                   around the unit's inputs)  backward is done: free the buffers again

The reduce-scatter is not here: each trainable FlatGroup does it from a post-accumulate-grad hook on
its flat leaf, the moment autograd has finished that group's gradient (see flat_group.py).
A unit whose outputs need no gradient (a frozen embedding fed token ids) has no backward: it is
never gathered, nor prefetched, for backward. Only module hooks and autograd hooks are used; torch
itself is not patched.
"""
import torch
from torch.autograd.graph import register_multi_grad_hook

from .collectives import log


class _BackwardDoneAtInputs(torch.autograd.Function):
    """Identity on the unit's inputs. Autograd runs its backward once the gradients with respect to
    all of them exist, which is when the unit's own backward has finished (PyTorch FSDP2 detects the
    end of a unit's backward the same way)."""

    @staticmethod
    def forward(ctx, unit, *inputs):
        ctx.unit = unit
        return inputs

    @staticmethod
    def backward(ctx, *grads):
        ctx.unit.post_backward()
        return (None, *grads)


def _map_tensors(fn, obj):
    """Apply ``fn`` to every tensor in nested tuples / lists / dicts, keeping the structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        items = [_map_tensors(fn, item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples too
    if isinstance(obj, dict):
        return type(obj)({key: _map_tensors(fn, value) for key, value in obj.items()})
    return obj


def _tensors_needing_grad(obj) -> list:
    found = []
    _map_tensors(lambda t: found.append(t) if t.requires_grad else None, obj)
    return found


class ShardedUnit:
    """The FlatGroups of one module plus the hooks that gather and free them around its compute."""

    def __init__(self, name, module, groups, runtime):
        self.name, self.module, self.groups, self.runtime = name, module, groups, runtime
        self.is_root = module is runtime.module
        self.rank = runtime.rank
        self.has_backward = True  # set by every forward: do the unit's outputs need a gradient?
        module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        module.register_forward_hook(self._post_forward)

    def gather(self, wait: bool = True, why: str = "") -> None:
        """All-gather every group (issued together); ``wait=False`` returns with them in flight (prefetch)."""
        for group in self.groups:
            group.start_gather(why)
        if wait:
            for group in self.groups:
                group.wait()

    def free(self) -> None:
        for group in self.groups:
            group.free()

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, module, args, kwargs):
        runtime = self.runtime
        log.debug("rank %d pre-forward %s%s", self.rank, self.name, " (recompute)" if runtime.in_backward else "")
        runtime.record_forward(self)
        self.gather()
        for group in self.groups:
            group.point_module_at_views()
        if runtime.in_backward:  # activation checkpointing re-runs forward inside backward: compute only
            return None
        if runtime.prefetch and (following := runtime.next_in_forward(self)) is not None:
            following.gather(wait=False, why=" (prefetch for forward)")
        inputs = _tensors_needing_grad((args, kwargs)) if torch.is_grad_enabled() else []
        if not inputs:  # e.g. token ids: the end-of-backward callback frees this unit instead
            return None
        marked = iter(_BackwardDoneAtInputs.apply(self, *inputs))
        swap = {id(t): next(marked) for t in inputs}
        return _map_tensors(lambda t: swap.get(id(t), t), (args, kwargs))

    def _post_forward(self, module, args, output):
        runtime = self.runtime
        if runtime.in_backward:  # checkpoint recompute: backward still needs the gathered tensors
            return
        log.debug("rank %d post-forward %s", self.rank, self.name)
        if self.is_root:
            runtime.finish_forward()
        outputs = _tensors_needing_grad(output) if torch.is_grad_enabled() else []
        self.has_backward = bool(outputs)
        # Keep the unit gathered only if its backward will run and either the user asked
        # (reshard_after_forward=False) or it is the root, whose backward starts right away (as in FSDP2).
        if not (self.has_backward and (self.is_root or not runtime.reshard_after_forward)):
            self.free()
        if outputs:
            register_multi_grad_hook(outputs, self._pre_backward, mode="any")

    def _pre_backward(self, grad):
        runtime = self.runtime
        log.debug("rank %d pre-backward %s", self.rank, self.name)
        runtime.start_backward()
        self.gather(why=" (for backward)")
        for group in self.groups:  # for backward code that reads the module's attributes again
            group.point_module_at_views()
        if runtime.prefetch and (previous := runtime.next_in_backward(self)) is not None:
            previous.gather(wait=False, why=" (prefetch for backward)")

    def post_backward(self) -> None:
        log.debug("rank %d post-backward %s", self.rank, self.name)
        self.free()
