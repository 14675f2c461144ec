"""write_files_atomically and save_adapter under faults: a failure or a kill injected after every step
(each file written, each fsync, each rename) leaves the previous adapter loadable and unchanged, or --
only past the commit rename -- the complete new one; the next write cleans up what a kill left."""
import pytest
import torch

import lora
import lora.atomic_files as atomic_files
from test_lora_adapter_io import adapted_tiny_model
from test_lora_inject import TinyModel, VOCAB

STEPS = 8  # 2 files (each written, then fsync'ed), fsync of the new directory, 2 renames, fsync of the parent
IDS = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


class Injected(BaseException):
    """A fault: an exception (the writer's clean-up runs) or a kill (the clean-up is disabled)."""


def outputs_of(directory):
    torch.manual_seed(0)
    fresh = TinyModel()  # the base weights of adapted_tiny_model
    lora.load_adapter(fresh, directory)
    with torch.no_grad():
        return fresh(IDS)


def record_steps(monkeypatch, fail_after=None, kill=False):
    """Wrap each step of a write; raise `Injected` after step number ``fail_after``. Returns the step log."""
    log, real = [], {"rename": atomic_files.os.rename, "_write_file": atomic_files._write_file,
                     "_fsync": atomic_files._fsync, "recover": atomic_files.recover}

    def step(kind):
        def run(*args):
            real[kind](*args)
            log.append((kind, *[str(a) for a in args if not isinstance(a, bytes)]))
            if len(log) - 1 == fail_after:
                raise Injected(f"after step {fail_after}: {log[-1]}")
        return run

    def recover(directory):
        if not (kill and fail_after is not None and len(log) > fail_after):  # a killed process cleans nothing
            real["recover"](directory)

    monkeypatch.setattr(atomic_files.os, "rename", step("rename"))
    monkeypatch.setattr(atomic_files, "_write_file", step("_write_file"))
    monkeypatch.setattr(atomic_files, "_fsync", step("_fsync"))
    monkeypatch.setattr(atomic_files, "recover", recover)
    return log


def hidden_leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def step_log(tmp_path_factory):
    """The steps of overwriting an adapter, from one clean run."""
    directory = tmp_path_factory.mktemp("clean") / "adapter"
    lora.save_adapter(adapted_tiny_model(r=2), directory)
    with pytest.MonkeyPatch.context() as monkeypatch:
        log = record_steps(monkeypatch)
        lora.save_adapter(adapted_tiny_model(r=3), directory)
    return log


def test_the_steps_write_both_files_then_swap_with_two_renames(step_log, tmp_path):
    assert len(step_log) == STEPS, step_log  # the fault test below injects after each of them
    written = [s[1].rsplit("/", 1)[-1] for s in step_log if s[0] == "_write_file"]
    assert sorted(written) == ["adapter_config.json", "adapter_model.safetensors"]
    renames = [(s[1].rsplit("/", 1)[-1], s[2].rsplit("/", 1)[-1]) for s in step_log if s[0] == "rename"]
    assert renames == [("adapter", ".adapter.previous"), (".adapter.writing", "adapter")]
    assert step_log.index(next(s for s in step_log if s[0] == "rename")) > max(
        i for i, s in enumerate(step_log) if s[0] == "_write_file")


@pytest.mark.parametrize("kill", [False, True], ids=["failure", "kill"])
@pytest.mark.parametrize("fail_after", range(STEPS))
def test_a_fault_after_any_step_leaves_one_complete_adapter(tmp_path, monkeypatch, step_log, fail_after, kill):
    directory = tmp_path / "adapter"
    lora.save_adapter(adapted_tiny_model(r=2), directory)
    old_bytes = {p.name: p.read_bytes() for p in directory.iterdir()}
    old, new_model = outputs_of(directory), adapted_tiny_model(r=3)
    with torch.no_grad():
        new = new_model(IDS)
    committed = fail_after >= step_log.index(next(s for s in step_log if s[0] == "rename" and s[2].endswith("/adapter")))

    record_steps(monkeypatch, fail_after, kill)
    with pytest.raises(Injected):
        lora.save_adapter(new_model, directory)
    monkeypatch.undo()

    torch.testing.assert_close(outputs_of(directory), new if committed else old)  # load_adapter finds the set
    if not committed:
        assert {p.name: p.read_bytes() for p in lora.committed_directory(directory).iterdir()} == old_bytes
    if not kill:
        assert hidden_leftovers(tmp_path) == []
    lora.save_adapter(new_model, directory)  # the next write recovers from whatever was left
    torch.testing.assert_close(outputs_of(directory), new)
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_after", range(4))
def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch, fail_after):
    record_steps(monkeypatch, fail_after)
    with pytest.raises(Injected):
        lora.write_files_atomically(tmp_path / "set", {"a.bin": b"1", "b.bin": b"2"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_other_files_are_carried_over_and_permissions_kept(tmp_path):
    directory = tmp_path / "set"
    lora.write_files_atomically(directory, {"a.json": b"{}", "b.bin": b"old"})
    (directory / "notes.txt").write_text("mine")
    directory.chmod(0o750)
    assert lora.write_files_atomically(directory, {"b.bin": b"new"}) == directory
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == {"a.json": b"{}", "b.bin": b"new",
                                                                    "notes.txt": b"mine"}
    assert directory.stat().st_mode & 0o777 == 0o750
    lora.write_files_atomically(directory, {"big.bin": lambda path: path.write_bytes(b"x" * 10)})  # a writer
    assert (directory / "big.bin").read_bytes() == b"x" * 10


@pytest.mark.parametrize("files, error, match", [
    ({}, TypeError, "non-empty dict"),
    ([("a", b"")], TypeError, "non-empty dict"),
    ({"../a": b""}, ValueError, "plain file name"),
    ({"sub/a": b""}, ValueError, "plain file name"),
    ({"": b""}, ValueError, "plain file name"),
    ({"a": "text"}, TypeError, r"files\['a'\] must be bytes"),
])
def test_bad_file_sets_are_refused_before_anything_is_written(tmp_path, files, error, match):
    with pytest.raises(error, match=match):
        lora.write_files_atomically(tmp_path / "set", files)
    assert list(tmp_path.iterdir()) == []


def test_bad_directories_are_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        lora.write_files_atomically(tmp_path / "file", {"a": b""})
    (tmp_path / "set" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"subdirectories \['sub'\]"):
        lora.write_files_atomically(tmp_path / "set", {"a": b""})
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike"):
        lora.write_files_atomically(3, {"a": b""})
    with pytest.raises(ValueError, match="directory of its own"):
        lora.write_files_atomically("..", {"a": b""})
    (tmp_path / "set" / "sub").rmdir()
    monkeypatch.chdir(tmp_path / "set")
    assert lora.committed_directory(".") == tmp_path / "set"  # reading from inside the directory


def test_a_diverged_adapter_does_not_replace_the_saved_one(tmp_path):
    lora.save_adapter(adapted_tiny_model(), tmp_path / "adapter")
    before = outputs_of(tmp_path / "adapter")
    model = adapted_tiny_model()
    with torch.no_grad():
        model.layers[0].attn.q_proj.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj\.lora_B\.weight holds non-finite"):
        lora.save_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(outputs_of(tmp_path / "adapter"), before)
