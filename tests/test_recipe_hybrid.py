"""``--shard hybrid`` / ``--shard fsdp2-hybrid`` and ``--shard-size``: the layout chosen, and clear errors.

The training itself, on two torchrun "nodes", is tests/test_multinode.py."""
import pytest

from recipe.build import BuildOptions
from recipe.train import cli


@pytest.mark.parametrize("kwargs, match", [
    ({"shard": "ours", "shard_size": 2}, "--shard-size is for --shard hybrid or fsdp2-hybrid, got --shard ours"),
    ({"shard": "fsdp2", "shard_size": 2}, "--shard-size is for"),
    ({"shard": "hybrid", "shard_size": 0}, "--shard-size must be a positive integer, got 0"),
    ({"shard": "hybrid", "shard_size": 2.0}, "--shard-size must be a positive integer, got 2.0"),
    ({"shard": "fsdp2-hybrid", "quant": "bnb"}, "--quant bnb with --shard fsdp2"),
])
def test_bad_build_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BuildOptions(**kwargs)


def test_the_command_line_says_what_is_wrong_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # one process, no torchrun
    with pytest.raises(SystemExit) as exited:
        cli(["--shard", "ours", "--shard-size", "2", "--no-progress"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --shard-size is for --shard hybrid or fsdp2-hybrid, got --shard ours\n"


@pytest.mark.parametrize("local_world_size, shard_size, expected", [
    ("2", None, (2, 2)), (None, 4, (1, 4)), ("2", 1, (4, 1)),     # (replicas, shard size)
    ("3", None, "--shard-size 3 must divide the world size 4"), ("2", 3, "--shard-size 3 must divide"),
    (None, None, "--shard-size: not given, and LOCAL_WORLD_SIZE is not set"),
])
def test_the_layout_comes_from_the_node_size_or_shard_size(monkeypatch, local_world_size, shard_size, expected):
    from recipe.twins import sharders

    monkeypatch.setattr(sharders.dist, "get_world_size", lambda: 4)  # what a 4-rank group answers
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if local_world_size is not None:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    if isinstance(expected, tuple):
        assert sharders.hybrid_shape(shard_size) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            sharders.hybrid_shape(shard_size)


def test_a_checkpoint_of_another_layout_is_refused_by_shape():
    import torch

    from recipe.twins.sharders import Unsharded

    model = Unsharded(torch.nn.Linear(4, 2, bias=False))  # this rank's part: [2, 4]
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"trainable tensor 0 has shape \(2, 4\), the checkpoint's has \(4,\)"):
        model.load_local_state(optimizer, {"param.0": torch.zeros(4)})  # e.g. a slice of another --shard-size
    with pytest.raises(ValueError, match="the checkpoint's has None"):
        model.load_local_state(optimizer, {})
