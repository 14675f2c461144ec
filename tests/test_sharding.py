"""sharding, end to end with real processes: gloo on CPU, world sizes 1, 2, 3 (uneven shards, padding).

One spawned job per world size runs every check (spawning costs seconds, the checks milliseconds)
and returns tensors; the tests below compare them with a plain single-process run and with PyTorch
FSDP2 ``fully_shard`` on the same model and data.
"""
import gc
import logging
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sharding
from distributed import start_on_ranks
from reference_libs import reference

VOCAB, DIM, HIDDEN, LAYERS, BATCH, STEPS = 11, 7, 10, 3, 12, 3  # odd sizes: every world size pads


class Block(nn.Module):
    """A residual MLP block; reads a buffer at forward time (the hooks must point it at gathered data)."""

    def __init__(self, dim=DIM, hidden=HIDDEN):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(dim))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim, bias=False)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return x + self.scale * self.down(F.silu(self.up(x * self.norm)))


class Tiny(nn.Module):
    """Embedding -> blocks -> head -> cross-entropy; the embedding and head stay in the root unit."""

    def __init__(self, use_checkpoint=False, dim=DIM, tie=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(LAYERS))
        self.head = nn.Linear(dim, VOCAB, bias=False)
        if tie:  # one tensor under two names, both in the root unit
            self.head.weight = self.embed.weight
        self.use_checkpoint = use_checkpoint

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.use_checkpoint else layer(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


class FrozenMix(nn.Module):
    """A QLoRA-shaped unit: frozen uint8 codes, fp32 absmax buffer, frozen bf16 norm, trainable fp32 A/B."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.register_buffer("codes", torch.randint(0, 256, (DIM, DIM), dtype=torch.uint8, generator=generator))
        self.register_buffer("absmax", torch.rand(DIM, generator=generator) + 0.5)
        self.norm = nn.Parameter(torch.randn(DIM, generator=generator).bfloat16(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(2, DIM, generator=generator) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(DIM, 2, generator=generator) * 0.1)

    def forward(self, x):
        self.seen = {"codes": self.codes.clone(), "absmax": self.absmax.clone(), "norm": self.norm.clone()}
        weight = (self.codes.float() / 255 - 0.5) * self.absmax[:, None]
        return (x * self.norm.float()) @ weight.T + x @ self.lora_A.T @ self.lora_B.T


class _MatmulReadingWeightInBackward(torch.autograd.Function):
    """Saves no weight and reads ``module.weight`` again in backward (as lora's frozen path does)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x @ module.weight.T

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.weight, None


class FrozenReadInBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(5)), requires_grad=False)

    def forward(self, x):
        return _MatmulReadingWeightInBackward.apply(x, self)


def frozen_model():
    return nn.Sequential(FrozenMix(), FrozenReadInBackward(), FrozenMix())


def frozen_input():
    return torch.randn(4, DIM, generator=torch.Generator().manual_seed(6)).requires_grad_()


def global_batch():
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randint(0, VOCAB, (BATCH, 5), generator=generator) for _ in range(2))


VARIANTS = {  # name: (shard_model options, micro-batches per step, activation checkpointing, clip, tied)
    "default": ({}, 1, False, None, False),
    "no_prefetch_keep_gathered": (dict(prefetch=False, reshard_after_forward=False), 1, False, None, False),
    "offload_and_clip": (dict(offload=True), 1, False, 0.05, False),
    "offload_and_accumulate": (dict(offload=True), 2, False, None, False),
    "checkpoint_and_accumulate": ({}, 2, True, None, False),
    "tied_embedding_and_head": ({}, 1, False, None, True),
    "built_on_meta_materialized_per_unit": (dict(materialize=True), 1, False, None, False),
}


def on_meta_with_loader(source):
    """``source`` rebuilt on meta, its root tensors loaded, plus a ``materialize`` that loads each unit
    from ``source``'s state dict (as recipe.build loads a decoder layer from the checkpoint) and
    records the order it was called in."""
    state, order = source.state_dict(), []
    with torch.device("meta"):
        model = Tiny(source.use_checkpoint)

    def load(module, prefix):
        module.to_empty(device="cpu")
        module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})

    load(model.embed, "embed."), load(model.head, "head.")
    names = {module: name for name, module in model.named_modules()}
    materialize = lambda unit: order.append(names[unit]) or load(unit, names[unit] + ".")  # noqa: E731
    return model, materialize, order


def train_sharded(rank, world, options, micro_batches, use_checkpoint, clip, tie):
    torch.manual_seed(0)
    model, order = Tiny(use_checkpoint, tie=tie), None
    if options.get("materialize"):
        model, materialize, order = on_meta_with_loader(model)
        options = {**options, "materialize": materialize}
    sharded = sharding.shard_model(model, list(model.layers), **options)
    optimizer = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    tokens, targets = (t.chunk(world)[rank] for t in global_batch())  # this rank's slice of the batch
    losses = []
    for _ in range(STEPS):
        for tokens_mb, targets_mb in zip(tokens.chunk(micro_batches), targets.chunk(micro_batches)):
            loss = sharded(tokens_mb, targets_mb) / micro_batches
            loss.backward()
            losses.append(loss.item())
        if clip is not None:
            sharding.clip_grad_norm_(sharded, clip)
        optimizer.step()
        optimizer.zero_grad()
    return {"state": sharding.full_state_dict(sharded), "memory": sharding.memory_report(sharded, optimizer),
            "losses": losses, "materialize_order": order,
            "groups": [(g.trainable, g.shard_numel, g.slots[-1].offset + g.slots[-1].span)
                       for u in sharded.units for g in u.groups]}


def train_reference(clip, tie):
    """One process, the whole batch, plain PyTorch (run by rank 0 of each job: one thread, torch warm)."""
    torch.manual_seed(0)
    model = Tiny(tie=tie)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        model(*global_batch()).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
    trainable = {k for k, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def frozen_round_trip(rank, world):
    """Shard -> gather a unit of mixed dtypes; record what forward saw and which groups were reduced."""
    model = frozen_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("sharding")
    logger.addHandler(handler), logger.setLevel(logging.DEBUG)
    sharded = sharding.shard_model(model, list(model))
    sharded(x := frozen_input()).sum().backward()
    logger.removeHandler(handler), logger.setLevel(logging.WARNING)
    return {"original": original, "seen": [model[0].seen, model[2].seen], "messages": messages, "x_grad": x.grad,
            "gathered": sharding.full_state_dict(sharded, trainable_only=False),
            "has_grad": [p.grad is not None for p in sharded.parameters()]}


def state_dict_round_trip(rank, world):
    """full_state_dict -> load_full_state_dict into a fresh sharded model -> same state and same loss."""
    torch.manual_seed(0)
    first = sharding.shard_model(model := Tiny(), list(model.layers))
    saved = [sharding.full_state_dict(first, trainable_only=False)]
    dist.broadcast_object_list(saved, src=0)  # every rank loads the same full dict
    torch.manual_seed(1)
    second = sharding.shard_model(model := Tiny(), list(model.layers))
    sharding.load_full_state_dict(second, saved[0])
    with torch.no_grad():
        losses = [first(*global_batch()).item(), second(*global_batch()).item()]
    return {"saved": saved[0], "reloaded": sharding.full_state_dict(second, trainable_only=False), "losses": losses}


def offload_arena(rank, world):
    """With offload every shard, and each trainable group's gradient and its landing slice, is a slice of
    one host arena: its size is their sum, each rounded up to 64 bytes, and nothing else."""
    torch.manual_seed(0)
    sharded = sharding.shard_model(model := Tiny(), list(model.layers), offload=True)
    arena = sharded.offload.arena
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    groups = [g for u in sharded.units for g in u.groups]
    sharded(*global_batch()).backward()
    held = [g.master if g.trainable else g.local for g in groups] + [p.grad for p in sharded.parameters()]
    return {"arena": arena.numel(), "pinned": sharding.memory_report(sharded)["pinned"],
            "requests": [numel * dtype.itemsize for g in groups for numel, dtype in g.host_buffers().values()],
            "inside": all(start <= t.data_ptr() < end and t.device.type == "cpu" for t in held)}


def originals_freed_by_slicing(rank, world):
    """How many of the model's full tensors are still alive right after shard_model, with Python's cycle
    collector off: every one must be freed by reference counting alone, as soon as its unit is sliced."""
    torch.manual_seed(0)
    model = Tiny()
    originals = [weakref.ref(t) for t in [*model.parameters(), *model.buffers()]]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        sharded = sharding.shard_model(model, list(model.layers))
        alive = sum(ref() is not None for ref in originals)
    finally:
        if was_enabled:
            gc.enable()
    del sharded
    return alive


def disagreeing_ranks(rank, world):
    """Rank 0 builds a wider model than the others: every rank must raise, none may hang."""
    model = Tiny(dim=DIM + (rank == 0))
    try:
        sharding.shard_model(model, list(model.layers))
    except ValueError as error:
        return str(error)
    return None


def meta_left_by_materialize(rank, world):
    """A materialize that forgets one tensor: a clear error naming the unit (every rank raises alike)."""
    model, materialize, _ = on_meta_with_loader(Tiny())

    def forgetful(unit):
        materialize(unit)
        if unit is model.layers[1]:
            unit.norm = nn.Parameter(torch.empty(DIM, device="meta"))
    try:
        sharding.shard_model(model, list(model.layers), materialize=forgetful)
    except ValueError as error:
        return str(error)
    return None


def fsdp2_comparison(rank, world):
    """The same model and data under ours and under FSDP2 fully_shard, in fp32 and with bf16 compute
    (fp32 masters, fp32 reduce): losses and gradients of two AdamW steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    tokens, targets = (t.chunk(world)[rank] for t in global_batch())
    runs = {}
    for compute_dtype in (None, torch.bfloat16):
        for name in ("ours", "fsdp2"):
            torch.manual_seed(0)
            model = Tiny()
            if name == "ours":
                wrapped = sharding.shard_model(model, list(model.layers), compute_dtype=compute_dtype)
                parameters, grads = wrapped.parameters(), lambda: sharding.full_grads(wrapped)
            else:
                mesh = init_device_mesh("cpu", (world,))
                policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
                for layer in model.layers:
                    fully_shard(layer, mesh=mesh, mp_policy=policy)
                wrapped = fully_shard(model, mesh=mesh, mp_policy=policy)
                parameters = model.parameters()
                grads = lambda: {k: p.grad.full_tensor() for k, p in model.named_parameters()}  # noqa: E731
            optimizer = torch.optim.AdamW(parameters, lr=1e-2)
            losses, step_grads = [], []
            for _ in range(2):
                loss = wrapped(tokens, targets)
                loss.backward()
                losses.append(loss.item())
                step_grads.append(grads())
                optimizer.step()
                optimizer.zero_grad()
            runs[name, str(compute_dtype)] = {"losses": losses, "grads": step_grads}
    return runs


def job(rank, world):
    out = {name: train_sharded(rank, world, *variant) for name, variant in VARIANTS.items()}
    out["reference"] = {v[3:]: train_reference(*v[3:]) for v in VARIANTS.values()} if rank == 0 else None
    out["frozen"] = frozen_round_trip(rank, world)
    out["state_dict"] = state_dict_round_trip(rank, world)
    out["originals_alive"] = originals_freed_by_slicing(rank, world)
    out["disagree"] = disagreeing_ranks(rank, world) if world > 1 else None
    out["offload_arena"] = offload_arena(rank, world)
    out["meta_left"] = meta_left_by_materialize(rank, world)
    out["fsdp2"] = fsdp2_comparison(rank, world) if world == 2 else None
    return out


WORLD_SIZES = (1, 2, 3)
_jobs = {}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def ranks(request):
    """Start the jobs of all world sizes together (their start-up overlaps), then wait for this one."""
    if not _jobs:
        _jobs.update({world: start_on_ranks(job, world, timeout_s=240) for world in WORLD_SIZES})
    world = request.param
    if not isinstance(_jobs[world], list):
        _jobs[world] = _jobs[world].results()
    return world, _jobs[world]


def relative_error(ours, theirs):
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sharded_adamw_equals_single_process(ranks, variant):
    world, results = ranks
    ours = results[0][variant]["state"]
    reference_state = results[0]["reference"][VARIANTS[variant][3:]]
    assert ours.keys() == reference_state.keys()
    errors = {k: relative_error(ours[k], reference_state[k]) for k in ours}
    assert max(errors.values()) <= 1e-5, errors
    assert all(results[r][variant]["state"] == {} for r in range(1, world))  # gathered on rank 0 only


def test_each_rank_holds_one_slice_and_one_slice_of_optimizer_state(ranks):
    world, results = ranks
    for result in results:
        memory, groups = result["default"]["memory"], result["default"]["groups"]
        assert all(shard == -(-numel // world) for _, shard, numel in groups)  # ceil(numel / world): padding < world
        # Tiny is fp32: masters hold 4 bytes an element; the frozen group (the `scale` buffers) holds bytes
        assert memory["shards"] == sum(shard * (4 if trainable else 1) for trainable, shard, _ in groups)
        assert memory["unsharded"] == 4 * (sum(numel for trainable, _, numel in groups if trainable) + LAYERS)
        trainable = sum(shard for is_trainable, shard, _ in groups if is_trainable)
        # AdamW keeps exp_avg + exp_avg_sq (+ a step counter per parameter)
        assert 2 * 4 * trainable <= memory["optimizer"] <= 2 * 4 * trainable + 8 * len(groups)
        assert memory["gathered"] == 0 and memory["grads"] == 0  # after step + zero_grad, nothing is held


def test_the_full_tensors_are_freed_as_soon_as_sliced_without_the_cycle_collector(ranks):
    """A reference cycle in the wrapping code would keep a unit's full tensors alive until Python's cycle
    collector ran, possibly through the first training steps, above the memory of the shards."""
    world, results = ranks
    assert [r["originals_alive"] for r in results] == [0] * world


def test_frozen_uint8_and_bf16_round_trip_bit_exactly_and_are_never_reduced(ranks):
    """Also: a module that reads its frozen weight again in backward sees the re-gathered values."""
    world, results = ranks
    for result in (r["frozen"] for r in results):
        original = result["original"]
        for index, seen in zip((0, 2), result["seen"]):
            for name, value in seen.items():
                assert value.dtype == original[f"{index}.{name}"].dtype
                assert torch.equal(value.view(torch.uint8), original[f"{index}.{name}"].view(torch.uint8))
        reduced = [m for m in result["messages"] if "reduce-scatter" in m]
        assert reduced and all("trainable" in m for m in reduced)
        assert result["has_grad"] and all(result["has_grad"])  # every trainable master shard got one
    model = frozen_model()  # unsharded: the gradient w.r.t. the input must be the same
    model(x := frozen_input()).sum().backward()
    for result in (r["frozen"] for r in results):
        torch.testing.assert_close(result["x_grad"], x.grad, rtol=1e-6, atol=1e-6)
    gathered, original = results[0]["frozen"]["gathered"], results[0]["frozen"]["original"]
    assert gathered.keys() == original.keys()
    for key, value in gathered.items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key


def test_full_state_dict_load_round_trip(ranks):
    world, results = ranks
    result = results[0]["state_dict"]
    assert result["saved"].keys() == result["reloaded"].keys() and len(result["saved"]) == 2 + 5 * LAYERS
    assert all(torch.equal(result["saved"][k], result["reloaded"][k]) for k in result["saved"])
    for r in results:
        assert r["state_dict"]["losses"][0] == r["state_dict"]["losses"][1]


@pytest.mark.parametrize("ranks", [2, 3], indirect=True, ids=lambda w: f"world{w}")  # 1 rank agrees with itself
def test_ranks_that_built_different_models_all_get_a_clear_error(ranks):
    world, results = ranks
    for result in results:
        assert result["disagree"] is not None and "different models" in result["disagree"]


@pytest.mark.parametrize("ranks", [2], indirect=True, ids=lambda w: f"world{w}")  # the job runs FSDP2 on 2 ranks
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=["fp32", "bf16_compute"])
def test_same_losses_and_gradients_as_fsdp2_fully_shard(ranks, compute_dtype):
    world, results = ranks
    reference("torch.distributed.fsdp")
    tolerance = 1e-5 if compute_dtype is None else 0.0  # measured: bit-identical with bf16 compute
    fp32, bf16 = (results[0]["fsdp2"]["ours", str(d)]["losses"] for d in (None, torch.bfloat16))
    assert fp32 != bf16  # the compute dtype really changed the arithmetic
    for r, result in enumerate(results):
        ours, theirs = (result["fsdp2"][name, str(compute_dtype)] for name in ("ours", "fsdp2"))
        assert ours["losses"] == pytest.approx(theirs["losses"], rel=tolerance, abs=0), r
        if r == 0:  # the gathered gradients live on rank 0
            for our_grads, their_grads in zip(ours["grads"], theirs["grads"]):
                assert our_grads.keys() == their_grads.keys()
                assert max(relative_error(our_grads[k], their_grads[k]) for k in our_grads) <= tolerance


def test_a_model_built_on_meta_and_materialized_unit_by_unit_trains_identically(ranks):
    """shard_model(..., materialize=...) loads each unit just before slicing it, in the order given:
    the same losses and parameters, bit for bit, as sharding the model built whole."""
    world, results = ranks
    for result in results:
        per_unit, whole = result["built_on_meta_materialized_per_unit"], result["default"]
        assert per_unit["materialize_order"] == [f"layers.{i}" for i in range(LAYERS)]
        assert per_unit["losses"] == whole["losses"]
        assert per_unit["state"].keys() == whole["state"].keys()
        assert all(torch.equal(per_unit["state"][k], whole["state"][k]) for k in whole["state"])


def test_a_tensor_left_on_meta_by_materialize_is_a_clear_error_naming_the_unit(ranks):
    world, results = ranks
    for result in results:
        assert result["meta_left"] is not None
        assert "unit 'layers.1' has tensors on the meta device ('layers.1.norm')" in result["meta_left"]


def test_offload_keeps_every_host_tensor_in_one_exactly_sized_arena(ranks):
    world, results = ranks
    for result in (r["offload_arena"] for r in results):
        assert result["arena"] == sum(-(-n // 64) * 64 for n in result["requests"])
        assert len(result["requests"]) == 3 * (1 + LAYERS) + LAYERS  # 3 per trainable group, 1 per frozen one
        assert result["inside"]  # shards, masters and their gradients all live in it
        assert result["pinned"] == 0  # no GPU: nothing is page-locked
