"""recipe/checkpoint.py: all-or-nothing saves (a failure injected after every file write and every rename,
on one rank and on each rank of 2 and 3), damaged files named on load, and the fingerprint check.

Each save is a sequence of file operations (per-rank file writes, then rank 0's renames). The fault tests
count them, then fail the save after operation k for every k: ``latest`` must still name a complete
checkpoint that loads with exactly the state it was saved with (the previous one, or the new one when
the failure came after ``latest`` was replaced), and the next save must succeed over the leftovers.
"""
import json

import pytest
import torch
import torch.distributed as dist

from distributed import free_port, start_on_ranks


class Injected(OSError):
    pass


def state_of(step: int, rank: int) -> dict:
    return {"w": torch.full((3, 2), float(step * 10 + rank)), "exp_avg": torch.arange(4.0) + step}


def meta_of(step: int) -> dict:
    return {"sampler": {"epoch": 0, "position": step, "seed": 0, "windows": 100}, "build.rank": 4}


def fail_after(k: int, monkeypatch, counter: list) -> None:
    """Make the k-th file operation of this process (a file write or a rename) raise once it is done."""
    from recipe import checkpoint, files

    def counted(real):
        def operation(*args, **kwargs):
            real(*args, **kwargs)
            counter.append(args[0])
            if len(counter) == k:
                raise Injected(f"injected after operation {k} ({args[0]})")
        return operation

    monkeypatch.setattr(checkpoint, "write_bytes_durably", counted(checkpoint.write_bytes_durably))
    monkeypatch.setattr(files.os, "replace", counted(files.os.replace))


def assert_loads_a_complete_checkpoint(directory, rank: int, allowed_steps) -> int:
    from recipe import checkpoint

    state, meta = checkpoint.load(checkpoint.latest(directory), fingerprint={"build.rank": 4})
    assert meta["step"] in allowed_steps and meta["sampler"]["position"] == meta["step"]
    expected = state_of(meta["step"], rank)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    return meta["step"]


def faults_on_every_operation(rank: int, world: int, directory: str, failing_rank: int, stale: bool) -> list[int]:
    """On ``failing_rank``, fail the save of step 2 after each of its file operations in turn; every rank
    must raise (none left waiting) and load step 1 (or step 2 once ``latest`` named it). Returns the
    injection points tried on this rank."""
    import pytest as _pytest

    from recipe import checkpoint

    tried = []
    for k in range(1, 20):
        base = f"{directory}/k{k}"
        checkpoint.save(base, 1, state_of(1, rank), meta_of(1))
        if stale:  # a step-2 directory left by an earlier killed run (renamed, never named by latest)
            checkpoint.save(base + "-stale", 2, state_of(2, rank), meta_of(2))
            if rank == 0:
                __import__("shutil").copytree(f"{base}-stale/step-000002", f"{base}/step-000002")
        counter = []
        with _pytest.MonkeyPatch.context() as patch:
            if rank == failing_rank:
                fail_after(k, patch, counter)
            try:
                checkpoint.save(base, 2, state_of(2, rank), meta_of(2))
                failed = False
            except OSError:
                failed = True
        flags = [None] * world
        dist.all_gather_object(flags, failed)
        assert len(set(flags)) == 1, f"injection {k}: some ranks raised, some did not: {flags}"
        if not failed:
            break
        tried.append(k)
        assert_loads_a_complete_checkpoint(base, rank, (1, 2))
        checkpoint.save(base, 3, state_of(3, rank), meta_of(3))  # the next save works over the leftovers
        assert assert_loads_a_complete_checkpoint(base, rank, (3,)) == 3
    return tried


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-step-dir"])
def test_a_failure_after_any_file_operation_leaves_a_complete_checkpoint(one_rank, tmp_path, stale):
    tried = faults_on_every_operation(0, 1, str(tmp_path), 0, stale)
    # two files, the directory rename (two with a stale directory moved aside first), the latest file
    assert tried == list(range(1, 6 if stale else 5))


def faults_on_each_rank(rank: int, world: int, directory: str) -> tuple[list[list[int]], str | None]:
    tried = [faults_on_every_operation(rank, world, f"{directory}/r{failing}", failing, False) for failing in range(world)]
    return tried, one_rank_damaged(rank, world, f"{directory}/damaged")


def one_rank_damaged(rank: int, world: int, directory: str) -> str | None:
    """Rank 1's tensor file of a saved checkpoint truncated: the message each rank raises on load."""
    from recipe import checkpoint

    final = checkpoint.save(directory, 1, state_of(1, rank), meta_of(1))
    if rank == 0:
        (final / "rank1.safetensors").write_bytes(b"\x00" * 5)
    dist.barrier()
    try:
        checkpoint.load(final, {"build.rank": 4})
    except ValueError as error:
        return str(error)
    return None


def test_a_failure_on_any_rank_of_2_or_3_stops_every_rank_and_leaves_a_complete_checkpoint(tmp_path):
    jobs = {world: start_on_ranks(faults_on_each_rank, world_size=world, args=(str(tmp_path / str(world)),),
                                  timeout_s=300) for world in (2, 3)}
    for world, job in jobs.items():
        results = job.results()
        for failing in range(world):  # rank 0 writes its two files and renames; the others write their two files
            assert results[failing][0][failing] == ([1, 2, 3, 4] if failing == 0 else [1, 2])
        # one rank's damaged file is an error on every rank, naming that rank and file
        messages = [message for _, message in results]
        assert messages[1] is not None and "rank1.safetensors is not a readable safetensors file" in messages[1]
        assert all(m == f"rank 1: {messages[1]}" for r, m in enumerate(messages) if r != 1)


def test_a_non_finite_state_is_refused_before_any_file_is_written(one_rank, tmp_path):
    from recipe import checkpoint

    with pytest.raises(ValueError, match="'w' has non-finite values"):
        checkpoint.save(tmp_path, 1, {"w": torch.tensor([1.0, float("nan")])}, meta_of(1))
    with pytest.raises(ValueError, match="Out of range float values"):
        checkpoint.save(tmp_path, 1, state_of(1, 0), {"sampler": {}, "lr": float("inf")})
    with pytest.raises(ValueError, match="keep must be an int >= 1 .*, got 0"):
        checkpoint.save(tmp_path, 1, state_of(1, 0), meta_of(1), keep=0)
    assert list(tmp_path.iterdir()) == []


def test_damaged_checkpoint_files_are_named(one_rank, tmp_path):
    from recipe import checkpoint

    final = checkpoint.save(tmp_path, 1, state_of(1, 0), meta_of(1))
    tensors, meta = final / "rank0.safetensors", final / "rank0.json"
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{tensors}.*not a readable safetensors file"):
        checkpoint.load(final, {"build.rank": 4})
    tensors.write_bytes(good)
    for text, expected in (("{not json", "not valid JSON"), ("[1, 2]", "lacks"), ('{"world_size": 1}', "lacks"),
                           (json.dumps({**meta_of(1), "step": "x", "world_size": 1}), "expected an integer")):
        meta.write_text(text)
        with pytest.raises(ValueError, match=expected) as error:
            checkpoint.load(final, {"build.rank": 4})
        assert str(meta) in str(error.value)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match="rank0.json is missing"):
        checkpoint.load(final, {})
    (tmp_path / "latest").write_text("step-000009\n")
    with pytest.raises(FileNotFoundError, match="step-000009, which is not there"):
        checkpoint.latest(tmp_path)


def test_world_size_and_each_differing_setting_are_named(one_rank, tmp_path):
    from recipe import checkpoint

    final = checkpoint.save(tmp_path, 1, state_of(1, 0), {**meta_of(1), "build.dora": False})
    with pytest.raises(ValueError) as error:
        checkpoint.load(final, {"build.rank": 8, "build.dora": True, "seq_len": 64})
    message = str(error.value)
    assert "build.dora: False in the checkpoint, True now" in message
    assert "build.rank: 4 in the checkpoint, 8 now" in message
    assert "seq_len: '(absent)' in the checkpoint, 64 now" in message
    data = json.loads((final / "rank0.json").read_text())
    (final / "rank0.json").write_text(json.dumps({**data, "world_size": 2}))
    with pytest.raises(ValueError, match="written by 2 ranks, this run has 1"):
        checkpoint.load(final, {"build.rank": 4, "build.dora": False})
