"""recipe.device: which device and backend a rank gets, and that a build puts everything on it.

No GPU runs here: CUDA's presence is simulated (monkeypatched ``torch.cuda`` queries) to test the
choice itself; the CUDA runs are ``benchmarks/gpu.sh``'s."""
import pytest
import torch

from recipe.build import BuildOptions, build
from recipe.device import default_dtype, device_peak_mib, resolve_device


def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)


@pytest.mark.parametrize("gpus, local_world, expected", [(0, 1, "cpu"), (1, 1, "cuda:0"), (2, 2, "cuda:1"),
                                                         (1, 2, "cpu")])
def test_auto_takes_a_gpu_per_process_when_there_is_one(monkeypatch, gpus, local_world, expected):
    fake_gpus(monkeypatch, gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_RANK", str(local_world - 1))
    assert resolve_device("auto") == torch.device(expected)


def test_explicit_cpu_and_cuda(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 1)


def test_bad_device_requests_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="--device must be one of"):
        resolve_device("gpu")
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"local rank 1 needs GPU 1, but 1 visible.*--nproc_per_node 1"):
        resolve_device("cuda")


def test_default_dtype_is_bf16_on_a_gpu_that_has_it(monkeypatch):
    fake_gpus(monkeypatch, 1, bf16=True)
    assert default_dtype(torch.device("cuda", 0)) == "bf16"
    fake_gpus(monkeypatch, 1, bf16=False)
    assert default_dtype(torch.device("cuda", 0)) == "fp32"
    assert default_dtype(torch.device("cpu")) in ("bf16", "fp32")


def test_build_places_every_tensor_on_the_requested_device(tiny_model):
    built = build(BuildOptions(model=tiny_model, shard="none", device="cpu"))
    assert built.device == torch.device("cpu") and built.load_peak_device_mib is None
    placed = {t.device for t in [*built.model.parameters(), *built.model.buffers()]}
    assert placed == {torch.device("cpu")}
    assert device_peak_mib(torch.device("cpu")) is None


def test_auto_counts_the_processes_a_launcher_is_about_to_start(monkeypatch):
    fake_gpus(monkeypatch, 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_device("auto", per_node=1) == torch.device("cuda", 0)
    assert resolve_device("auto", per_node=2) == torch.device("cpu")  # benchmarks.e2e --ranks 2 on one GPU


def test_gpu_budget_is_free_memory_after_start_up_minus_the_stated_headroom(monkeypatch):
    from recipe.device import HEADROOM, memory_budget

    fake_gpus(monkeypatch, 1)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (20 * 2**30, 24 * 2**30))
    cuda = torch.device("cuda", 0)
    assert sum(HEADROOM.values()) == 512 * 2**20
    assert memory_budget(cuda) == 20 * 2**30 - 512 * 2**20   # free, not total: context + NCCL already taken
    assert asked == [cuda]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**20, 24 * 2**30))
    assert memory_budget(cuda) == 0                            # never negative
    assert memory_budget(cuda, memory_gib=1.5) == int(1.5 * 2**30)  # an explicit --memory-gib wins


def test_budget_rejects_a_non_positive_memory_request():
    from recipe.device import memory_budget

    with pytest.raises(ValueError, match="--memory-gib must be > 0, got 0"):
        memory_budget(torch.device("cpu"), memory_gib=0)


def test_cpu_budget_is_this_ranks_share_of_available_memory(monkeypatch):
    from recipe.device import memory_budget

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = memory_budget(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert 0 < memory_budget(torch.device("cpu")) <= one // 4 + 2**30  # MemAvailable moves a little between reads


def test_cache_release_goes_to_the_gpu_only(monkeypatch):
    from recipe.device import release_cached_blocks

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    release_cached_blocks(torch.device("cpu"))
    assert calls == []
    release_cached_blocks(torch.device("cuda", 0))
    assert calls == ["empty_cache"]
