"""The sharding twins, and the one interface the loop, the adapter writer and the checkpoints use.

    ours          ``sharding.shard_model``   pulls each decoder layer through ``load_layer`` as it shards it
    hybrid        the same, on a 2-D layout  sharded within a node, replicated across nodes
    fsdp2         PyTorch ``fully_shard``    shards each unit right after it is loaded (DTensor parameters)
    fsdp2-hybrid  ``fully_shard`` on a 2-D   FSDP2's HSDP: a ``(replicate, shard)`` DeviceMesh
                  ``DeviceMesh``
    none          nothing sharded            plain data parallel: gradients all-reduced before clipping

Hybrid sharding (``sharding/groups.py``) puts the ranks in a grid of ``replicas x shard_size``: each
row (``shard_size`` consecutive ranks, by default torchrun's ``LOCAL_WORLD_SIZE``: one node) shards
the model as plain FSDP does, over the fast links inside a node; each column holds the same slice, and
only the gradient slices cross the slow links (one all-reduce per step). Plain FSDP is
``shard_size = world``; DDP-like replication is ``shard_size = 1``. ``BuildOptions.shard_size`` overrides
the default; both twins lay the ranks out the same way.

Each sharder is called as ``SHARDERS[name](model, ends, layers, load_layer, opts, process_group)``:
``ends`` (embedding, lm_head) are loaded already, ``load_layer(layer)`` loads, quantizes and wraps one
decoder layer. Each returns a `TrainableModel`.
"""
from __future__ import annotations

import abc
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

import nf4
import sharding

if TYPE_CHECKING:
    from ..build import BuildOptions

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter, beside its "step"


class TrainableModel(abc.ABC):
    """The built model as the loop sees it, whichever sharder made it. ``model`` is the ``nn.Module``
    (for ``train()``/``eval()`` and inspection); the rest are what a training step needs."""

    def __init__(self, model: nn.Module):
        self.model = model

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, loss) of the model; the loss is None without ``labels``."""

    @abc.abstractmethod
    def parameters(self) -> list[torch.Tensor]:
        """What the optimizer steps (this rank's trainable tensors, sharded or not)."""

    @abc.abstractmethod
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their global 2-norm (over all ranks) is at most ``max_norm``; return it as a
        0-d tensor on the device (a Python float would make every step wait for the GPU)."""

    @abc.abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor] | None:
        """{name: full fp32 CPU tensor} of every trainable tensor on rank 0, None elsewhere. Collective."""

    def to_local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a parameter (or of optimizer state shaped like it) as a plain tensor."""
        return tensor

    def from_local(self, local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_local`: a tensor shaped and placed like the parameter ``like``."""
        return local.to(like.device)

    def local_state(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """This rank's trainable tensors and their AdamW state, as plain CPU tensors (for a checkpoint)."""
        state = {}
        for i, p in enumerate(self.parameters()):
            state[f"param.{i}"] = self.to_local(p.detach())
            moments = optimizer.state.get(p, {})
            if moments:
                state[f"step.{i}"] = moments["step"].reshape(-1)  # a plain scalar tensor under every sharder
                state.update({f"{key}.{i}": self.to_local(moments[key]) for key in MOMENTS})
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

    @torch.no_grad()
    def load_local_state(self, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
        """Put back what `local_state` returned: the trainable tensors and the optimizer's state.

        Under hybrid sharding every replica saved its own copy of its slice, so each rank reads its own
        file. A checkpoint of another layout (another ``--shard-size``) has slices of other shapes: refused."""
        for i, p in enumerate(self.parameters()):
            local, saved = self.to_local(p), state.get(f"param.{i}")
            if saved is None or saved.shape != local.shape:
                raise ValueError(f"--resume: this rank's trainable tensor {i} has shape {tuple(local.shape)}, the "
                                 f"checkpoint's has {None if saved is None else tuple(saved.shape)} (written with "
                                 "another --shard / --shard-size / model?)")
            local.copy_(saved)
            if f"exp_avg.{i}" in state:
                optimizer.state[p] = {"step": state[f"step.{i}"].reshape(()).clone(),
                                      **{key: self.from_local(state[f"{key}.{i}"], p) for key in MOMENTS}}


def logits_and_loss(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``llama.Llama`` returns the logits alone without labels, ``(logits, loss)`` with them."""
    return out if isinstance(out, tuple) else (out, None)


def _gathered_on_rank0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    return state if dist.get_rank() == 0 else None


class OursSharded(TrainableModel):
    """``sharding.ShardedModel``: fp32 master shards, gathered per unit in forward and backward."""

    def __init__(self, model: nn.Module, sharded: sharding.ShardedModel):
        super().__init__(model)
        self.sharded = sharded

    def forward(self, input_ids, **inputs):
        return logits_and_loss(self.sharded(input_ids, **inputs))

    def parameters(self):
        return self.sharded.parameters()

    def clip_grad_norm_(self, max_norm):
        return sharding.clip_grad_norm_(self.sharded, max_norm)

    def trainable_state_dict(self):
        return _gathered_on_rank0(sharding.full_state_dict(self.sharded, trainable_only=True))


class Unsharded(TrainableModel):
    """The model's own trainable parameters: every rank holds all of them (data parallel)."""

    def forward(self, input_ids, **inputs):
        return logits_and_loss(self.model(input_ids, **inputs))

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def clip_grad_norm_(self, max_norm):
        world = dist.get_world_size()
        for p in self.parameters() if world > 1 else []:  # data parallel: average the gradients first
            dist.all_reduce(p.grad)
            p.grad /= world
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    def trainable_state_dict(self):
        return _gathered_on_rank0({n: p.detach().float().cpu() for n, p in self.model.named_parameters()
                                   if p.requires_grad})


class Fsdp2Sharded(Unsharded):
    """FSDP2: the parameters are DTensors sharded on dim 0; gradients are reduce-scattered in backward."""

    def clip_grad_norm_(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm).full_tensor()

    def trainable_state_dict(self):
        return _gathered_on_rank0({n: p.full_tensor().detach().float().cpu() for n, p in self.model.named_parameters()
                                   if p.requires_grad})

    def to_local(self, tensor):
        return tensor.to_local()

    def from_local(self, local, like):
        return type(like).from_local(local.to(like.to_local().device), like.device_mesh, like.placements)


LoadLayer = Callable[[nn.Module], None]


def hybrid_shape(shard_size: int | None) -> tuple[int, int]:
    """``(replicas, shard_size)`` of the default group: ``shard_size`` (``--shard-size``) if given, else
    torchrun's ``LOCAL_WORLD_SIZE`` (the ranks of one node; 1 process without torchrun is 1)."""
    world = dist.get_world_size()
    if shard_size is None:
        if "LOCAL_WORLD_SIZE" not in os.environ and world > 1:
            raise ValueError("--shard-size: not given, and LOCAL_WORLD_SIZE is not set to say how many ranks share "
                             "a node (launch with torchrun, or pass --shard-size)")
        shard_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world % shard_size:
        raise ValueError(f"--shard-size {shard_size} must divide the world size {world} (ranks per shard group; "
                         "the default is the ranks per node, torchrun's --nproc_per_node)")
    return world // shard_size, shard_size


def _shard_ours(model, ends, layers, load_layer: LoadLayer, opts: BuildOptions, **groups) -> TrainableModel:
    """``sharding.shard_model`` pulls each decoder layer through ``materialize`` as it reaches it."""
    def materialize(unit):
        if unit not in ends:  # a decoder layer (the ends are loaded already)
            load_layer(unit)

    sharded = sharding.shard_model(model, ends + layers, compute_dtype=opts.compute_dtype,
                                   reduce_dtype=torch.float32, offload=opts.offload, materialize=materialize,
                                   **groups)
    return OursSharded(model, sharded)


def shard_ours(model, ends, layers, load_layer: LoadLayer, opts: BuildOptions, process_group=None) -> TrainableModel:
    """Plain FSDP over ``process_group`` (default: every rank)."""
    return _shard_ours(model, ends, layers, load_layer, opts, process_group=process_group)


def shard_ours_hybrid(model, ends, layers, load_layer: LoadLayer, opts: BuildOptions,
                      process_group=None) -> TrainableModel:
    """Sharded within groups of ``shard_size`` consecutive ranks, replicated across them
    (``sharding.hybrid_groups``); the layout is over every rank, so ``process_group`` must be None."""
    _refuse_group("hybrid", process_group)
    groups = sharding.hybrid_groups(hybrid_shape(opts.shard_size)[1])
    return _shard_ours(model, ends, layers, load_layer, opts, shard_group=groups.shard_group,
                       replicate_group=groups.replicate_group)


def _refuse_group(shard: str, process_group) -> None:
    if process_group is not None:
        raise ValueError(f"--shard {shard} lays out every rank of the default group; process_group must be None, "
                         f"got {process_group!r}")


def nf4_tensors_as_buffers(model: nn.Module) -> None:
    """For FSDP2: re-register nf4.Linear4bit's frozen uint8/fp32 tensors as buffers, which FSDP2 leaves
    unsharded (replicated). FSDP2 refuses 0-dim parameters (the absmax offset) and gathers each unit's
    parameters in one dtype -- the reason FSDP1 + QLoRA stored 4-bit bytes as bf16 (chapter 5); our
    sharding flattens one buffer per dtype instead."""
    for module in model.modules():
        if isinstance(module, nf4.Linear4bit):
            for name, p in [(n, p) for n, p in module.named_parameters(recurse=False) if n.startswith("weight_")]:
                delattr(module, name)
                module.register_buffer(name, p.data)


def _fully_shard_each(model, ends, layers, load_layer: LoadLayer, opts: BuildOptions, mesh) -> TrainableModel:
    """``fully_shard`` on each end, on each decoder layer right after it is loaded, then on the root. On
    a 1-D mesh this is FSDP; on a 2-D ``(replicate, shard)`` mesh FSDP2 shards over the second dimension
    and replicates over the first (HSDP: gradients reduce-scattered, then all-reduced across replicas)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=opts.compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if opts.offload else OffloadPolicy()

    def shard(module):
        nf4_tensors_as_buffers(module)
        fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload)

    for unit in ends:
        shard(unit)
    for layer in layers:
        load_layer(layer)
        shard(layer)
    shard(model)
    return Fsdp2Sharded(model)


def shard_fsdp2(model, ends, layers, load_layer: LoadLayer, opts: BuildOptions, process_group=None) -> TrainableModel:
    """FSDP2 on a 1-D mesh of every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    _refuse_group("fsdp2", process_group)
    mesh = init_device_mesh(opts.device.type, (dist.get_world_size(),))
    return _fully_shard_each(model, ends, layers, load_layer, opts, mesh)


def shard_fsdp2_hybrid(model, ends, layers, load_layer: LoadLayer, opts: BuildOptions,
                       process_group=None) -> TrainableModel:
    """FSDP2's HSDP on a ``(replicas, shard_size)`` mesh: row r is ranks r*shard_size .. (r+1)*shard_size-1,
    the same grid as ``sharding.hybrid_groups``."""
    from torch.distributed.device_mesh import init_device_mesh

    _refuse_group("fsdp2-hybrid", process_group)
    mesh = init_device_mesh(opts.device.type, hybrid_shape(opts.shard_size), mesh_dim_names=("replicate", "shard"))
    return _fully_shard_each(model, ends, layers, load_layer, opts, mesh)


def replicate(model, ends, layers, load_layer: LoadLayer, opts: BuildOptions, process_group=None) -> TrainableModel:
    """Every rank loads and keeps the whole model."""
    for layer in layers:
        load_layer(layer)
    return Unsharded(model)


SHARDERS = {"ours": shard_ours, "hybrid": shard_ours_hybrid, "fsdp2": shard_fsdp2, "fsdp2-hybrid": shard_fsdp2_hybrid,
            "none": replicate}
HYBRID = ("hybrid", "fsdp2-hybrid")  # the sharders that read ``BuildOptions.shard_size``
