"""``--profile``: per-rank Chrome traces and the split of a step into compute / gather / reduce / optimizer /
data / idle (recipe/profile.py)."""
import json

import pytest

from distributed import run_on_ranks
from recipe.profile import PARTS, cpu_ms_per_step, summarize
from test_recipe_train import FAST, _train_one


def event(name, ts, dur, tid=1, cat="cpu_op"):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid, "cat": cat}


def test_a_handmade_trace_is_split_by_label_and_collective_name(tmp_path):
    label = "user_annotation"
    events = [event("ProfilerStep#2", 0, 1000, cat=label),
              event("data", 0, 50, cat=label),
              event("forward", 100, 300, cat=label),
              event("aten::mm", 100, 150),                      # compute 150
              event("c10d::_allgather_base_", 250, 40),         # gather 40, inside forward
              event("gloo:all_gather", 290, 100, tid=2),        # in flight on another thread while ours idles
              event("backward", 400, 400, cat=label),
              event("aten::mm", 400, 300),                      # compute 300
              event("c10d::_reduce_scatter_base_", 700, 60),    # reduce 60, inside backward
              event("optimizer", 800, 150, cat=label),
              event("c10d::allreduce_", 800, 10),               # reduce 10, inside the optimizer label
              event("aten::mm", 5000, 10)]                      # outside the step: ignored
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    s = summarize(trace)
    assert s["steps"] == 1
    assert s["parts_ms"] == pytest.approx({"compute": 0.45, "gather": 0.04, "reduce": 0.07, "optimizer": 0.14,
                                           "data": 0.05, "idle": 0.25})
    assert s["step_ms"] == pytest.approx(1.0)
    assert s["in_flight_ms"] == pytest.approx(0.1)  # forward's gap 290..400 overlaps the gather 290..390


def test_cpu_time_per_step_leaves_out_the_recorded_steps():
    stamps = [0.0, 1.0, 2.0, 12.0, 22.0, 32.0, 33.0, 34.0]  # 7 steps; steps 2-4 recorded (10 s each)
    assert cpu_ms_per_step(stamps, 7) == 1000.0
    assert cpu_ms_per_step([0.0, 5.0], 1) == 5000.0  # only the recorded step: it is all there is


def test_a_trace_without_steps_is_refused_by_name(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": [event("aten::mm", 0, 5)]}))
    with pytest.raises(ValueError, match="ProfilerStep"):
        summarize(trace)


@pytest.mark.parametrize("world", [1, 2])
def test_profile_writes_a_trace_per_rank_and_a_summary_whose_parts_sum_to_the_step(tiny_model, tmp_path, world):
    out = tmp_path / "run"
    run_on_ranks(_train_one, world, args=(tiny_model, out, ["--steps", "6", "--profile", *FAST]), timeout_s=300)
    for rank in range(world):
        events = json.loads((out / "profile" / f"rank{rank}.json").read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert {"data", "forward", "backward", "optimizer"} <= names
        assert sum(name.startswith("ProfilerStep#") for name in names) == 3  # steps 2-4
    summaries = json.loads((out / "profile" / "summary.json").read_text())["ranks"]
    assert len(summaries) == world
    for s in summaries:
        assert set(s["parts_ms"]) == set(PARTS) and min(s["parts_ms"].values()) >= 0
        assert sum(s["parts_ms"].values()) == pytest.approx(s["step_ms"])
        assert s["parts_ms"]["compute"] > 0 and 0 <= s["in_flight_ms"] <= s["parts_ms"]["idle"] + 1e-9
        assert s["parts_ms"]["gather"] > 0  # ours shards by default and gathers each unit before it runs
        assert s["cpu_ms_per_step"] > 0


def test_without_profile_no_trace_is_written(tiny_model, tmp_path):
    run_on_ranks(_train_one, 1, args=(tiny_model, tmp_path, ["--steps", "2", *FAST]), timeout_s=300)
    assert not (tmp_path / "profile").exists()
