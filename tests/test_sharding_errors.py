"""Bad input to shard_model fails at once with a clear error naming the argument (never a hang later),
and the spawned-ranks helper turns a failing rank into a readable error instead of a stuck test."""
import pytest
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
