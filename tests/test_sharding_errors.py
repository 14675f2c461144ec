"""Bad input to shard_model fails at once with a clear error naming the argument (never a hang later),
and the spawned-ranks helper turns a failing rank into a readable error instead of a stuck test."""
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import sharding
from distributed import run_on_ranks


def two_layers():
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))


@pytest.mark.parametrize("units, error, words", [
    (lambda m: [nn.Linear(3, 3)], ValueError, "units[0] (Linear) is not a submodule of model"),
    (lambda m: [m[0], m[1], m[0]], ValueError, "units[2] (Linear) is listed twice"),
    (lambda m: [m], ValueError, "units[0] is the model itself"),
    (lambda m: [m[0], "1"], TypeError, "units[1] must be an nn.Module"),
])
def test_bad_units_are_refused(units, error, words):
    model = two_layers()
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        sharding.shard_model(model, units(model))


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sharding.shard_model(lambda x: x, [])


def test_weights_tied_across_units_are_refused():
    model = two_layers()
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="shared by two units"):
        sharding.shard_model(model, [model[0], model[1]])


def test_without_a_process_group_the_error_says_so():
    assert not dist.is_initialized()
    model = two_layers()
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
        sharding.shard_model(model, [model[0]])


def fail_on_last_rank(rank, world):
    if rank == world - 1:
        raise ArithmeticError("boom on purpose")
    dist.barrier()  # the other ranks wait for a rank that will never come: the helper must stop them


def test_a_failing_rank_is_reported_and_the_others_are_stopped():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed in fail_on_last_rank.*ArithmeticError: boom"):
        run_on_ranks(fail_on_last_rank, 2, timeout_s=60)


@pytest.fixture
def one_rank():
    """A one-process gloo group in this process, destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharding_a_model_twice_is_a_clear_error(one_rank):
    model = two_layers()
    sharded = sharding.shard_model(model, [model[0]])
    with pytest.raises(TypeError, match="model is already a ShardedModel"):
        sharding.shard_model(sharded, [])
    with pytest.raises(ValueError, match="model: the model was already sharded by shard_model"):
        sharding.shard_model(model, [model[1]])
    outer = nn.Sequential(model, nn.Linear(3, 3))  # a sharded model inside a new one
    with pytest.raises(ValueError, match="model: 0 was already sharded"):
        sharding.shard_model(outer, [outer[1]])


@pytest.mark.parametrize("options, error, words", [
    (dict(compute_dtype=torch.int8), TypeError, "compute_dtype must be None or a floating torch.dtype, got torch.int8"),
    (dict(compute_dtype="bf16"), TypeError, "compute_dtype must be None or a floating torch.dtype, got 'bf16'"),
    (dict(reduce_dtype=None), TypeError, "reduce_dtype must be a floating torch.dtype, got None"),
    (dict(prefetch="yes"), TypeError, "prefetch must be True or False, got 'yes'"),
    (dict(offload=1), TypeError, "offload must be True or False, got 1"),
    (dict(reshard_after_forward=None), TypeError, "reshard_after_forward must be True or False, got None"),
    (dict(materialize=3), TypeError, "materialize must be callable or None, got int"),
    (dict(process_group="world"), TypeError, "shard_group must be a torch.distributed ProcessGroup or None"),
    (dict(replicate_group=7), TypeError, "replicate_group must be a torch.distributed ProcessGroup or None"),
])
def test_bad_options_are_refused_before_anything_changes(one_rank, options, error, words):
    model = two_layers()
    with pytest.raises(error, match=re.escape(words)):
        sharding.shard_model(model, [model[0]], **options)
    assert isinstance(model[0].weight, nn.Parameter)  # nothing was unregistered


def test_units_must_be_iterable():
    with pytest.raises(TypeError, match="units must be an iterable of submodules, got int"):
        sharding.shard_model(two_layers(), 3)


def test_hybrid_groups_needs_a_shard_size(one_rank, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="shard_size: not given and LOCAL_WORLD_SIZE is not set"):
        sharding.hybrid_groups()
    for bad in (0, 2, 1.0, True):
        with pytest.raises(ValueError, match=re.escape(f"must be a positive int dividing the world size 1, got {bad!r}")):
            sharding.hybrid_groups(bad)


def test_clip_and_load_refuse_bad_arguments(one_rank):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].register_buffer("codes", torch.zeros(4, dtype=torch.uint8))
    sharded = sharding.shard_model(model, [model[0], model[1]])
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match=re.escape(f"max_norm must be a positive number, got {bad!r}")):
            sharding.clip_grad_norm_(sharded, bad)
    with pytest.raises(TypeError, match="state_dict must be a dict of tensors, got list"):
        sharding.load_full_state_dict(sharded, [])
    with pytest.raises(TypeError, match=r"state_dict\['0.weight'\] must be a tensor, got list"):
        sharding.load_full_state_dict(sharded, {"0.weight": [[0.0] * 3] * 3})
    with pytest.raises(ValueError, match=r"state_dict\['1.codes'\]: dtype torch.int64, expected torch.uint8"):
        sharding.load_full_state_dict(sharded, {"1.codes": torch.zeros(4, dtype=torch.int64)}, strict=False)
    with pytest.raises(ValueError, match=r"state_dict\['0.bias'\]: shape \(4,\), expected \(3,\)"):
        sharding.load_full_state_dict(sharded, {"0.bias": torch.zeros(4)}, strict=False)
