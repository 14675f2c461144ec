"""The step-time model (recipe/timemodel.py), the bytes per link class (recipe/links.py), this machine's
micro-benchmark (recipe/microbench.py) and the planner's command line. No wall-clock time is asserted."""
import pytest

from recipe.links import Interconnect, collective_bytes, comm_seconds, compare_strategies, step_payloads
from recipe.plan import Setup, llama_config, lora_parameters
from recipe.timemodel import GPUS, PUBLISHED, Machine, published_check, step_flops, step_seconds

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)


def test_flops_by_hand_and_no_weight_gradient_for_the_frozen_base():
    setup = Setup(batch_size=2, seq_len=8, rank=4, world_size=1)
    tokens, n = 16, 2
    base = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128)          # q,o; k,v (kv width 32); gate, up, down
    lora = 2 * lora_parameters(llama_config(TINY), setup) / n
    attention, head = 2 * 8 * 64, 2 * 64 * 100
    flops = step_flops(TINY, setup)
    assert flops["forward"] == n * tokens * (base + lora + attention) + tokens * head
    assert flops["recompute"] == n * tokens * (base + lora + attention)       # checkpointing: the layers again
    # backward: the frozen base and lm_head only for the input gradient (1x), LoRA and attention 2x
    assert flops["backward"] == n * tokens * (base + 2 * lora + 2 * attention) + tokens * head
    assert step_flops(TINY, Setup(batch_size=2, seq_len=8, rank=4, activation_checkpointing=False))["recompute"] == 0


def test_collectives_overlap_compute_and_the_rest_adds_up():
    slow_net = Machine("x", matmul_flops=1e12, copy_bytes_per_s=1e10, dequantize_bytes_per_s=1e10,
                       host_link_bytes_per_s=1e10, gather_bytes_per_s=1e3)
    fast_net = Machine("y", 1e12, 1e10, 1e10, 1e10, 1e15)
    setup = Setup(batch_size=2, seq_len=8, rank=4)
    slow, fast = step_seconds(TINY, setup, slow_net), step_seconds(TINY, setup, fast_net)
    serial = ("compute", "dequantize", "elementwise", "offload", "optimizer", "ops")
    assert fast["step"] == pytest.approx(sum(fast[k] for k in serial))         # hidden under compute
    assert slow["step"] == pytest.approx(sum(slow[k] for k in serial) + slow["collectives"] - slow["compute"])
    assert step_seconds(TINY, Setup(offload=True), fast_net)["offload"] > 0 == fast["offload"]


def test_published_70b_runs_are_printed_beside_the_prediction():
    assert set(GPUS) == {"rtx3090", "rtx4090", "a100-40g", "h100"}
    assert PUBLISHED["rtx3090"] == pytest.approx(46.07, abs=0.01) and PUBLISHED["rtx4090"] == pytest.approx(17.18, abs=0.01)
    table = published_check()
    for name in PUBLISHED:
        row = next(line for line in table.splitlines() if line.startswith(name)).split()
        predicted, published, ratio = map(float, row[1:])
        assert published == pytest.approx(PUBLISHED[name], abs=0.05) and ratio == pytest.approx(predicted / published, abs=0.01)


def test_bytes_per_link_class_full_vs_hybrid_by_hand():
    setup = Setup(batch_size=1, seq_len=8, rank=4, world_size=4)
    payload = step_payloads(TINY, setup)
    full = collective_bytes(TINY, setup, nodes=2, gpus_per_node=2, strategy="full")
    hybrid = collective_bytes(TINY, setup, nodes=2, gpus_per_node=2, strategy="hybrid")
    assert full["all_gather"] == {"intra": 0, "inter": payload["all_gather"]}       # the one group spans nodes
    assert full["reduce_scatter"] == {"intra": 0, "inter": payload["reduce_scatter"]}
    assert full["all_reduce"] == {"intra": 0, "inter": 0}
    assert hybrid["all_gather"] == {"intra": payload["all_gather"], "inter": 0}
    assert hybrid["reduce_scatter"] == {"intra": payload["reduce_scatter"], "inter": 0}
    lora_grads = 4 * lora_parameters(llama_config(TINY), setup)                        # fp32, all layers
    assert hybrid["all_reduce"] == {"intra": 0, "inter": lora_grads // 2}             # this rank's 1/G shard
    one_node = collective_bytes(TINY, setup, nodes=1, gpus_per_node=4, strategy="full")
    assert one_node["all_gather"]["inter"] == 0 and one_node["all_gather"]["intra"] == payload["all_gather"]


def test_hybrid_wins_on_a_slow_network_and_the_verdict_says_so():
    setup = Setup(world_size=16, batch_size=2)
    slow = Interconnect(intra_gbs=300, inter_gbs=3)
    seconds = {s: comm_seconds(collective_bytes("llama-2-70b", setup, 2, 8, s), 2, 8, s, slow) for s in ("full", "hybrid")}
    assert seconds["hybrid"] < seconds["full"]
    assert "verdict: hybrid" in compare_strategies("llama-2-70b", setup, 2, 8, slow)
    with pytest.raises(ValueError, match="strategy must be 'full' or 'hybrid'"):
        collective_bytes(TINY, setup, 2, 2, "ddp")
    with pytest.raises(ValueError, match="nodes must be an integer >= 1"):
        collective_bytes(TINY, setup, 0, 2, "full")
    with pytest.raises(ValueError, match="inter_gbs must be > 0"):
        Interconnect(inter_gbs=0)


def test_microbenchmark_measures_positive_rates():
    from recipe.microbench import describe, measure_machine

    machine = measure_machine(ranks=1, dtype="float32", size=64, repeats=1)
    assert min(machine.matmul_flops, machine.copy_bytes_per_s, machine.dequantize_bytes_per_s,
               machine.gather_bytes_per_s, machine.op_seconds) > 0
    assert machine.host_link_bytes_per_s is None and "GFLOP/s" in describe(machine)
    with pytest.raises(ValueError, match="ranks >= 1"):
        measure_machine(ranks=0)


@pytest.mark.parametrize("argv, message", [
    (["llama-9"], "error: unknown preset 'llama-9'"),
    (["--world-size", "0"], "error: argument --world-size: expected an integer >= 1, got '0'"),
    (["--intra-gbs", "fast"], "error: argument --intra-gbs: expected a finite number > 0, got 'fast'"),
    (["--gpu", "rtx9090"], "error: argument --gpu: invalid choice"),
    (["--target-modules", "qkv"], "error: target_modules must be a non-empty subset"),
])
def test_command_line_user_errors_are_one_line_and_exit_2(capsys, argv, message):
    from recipe.plan import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_exception_and_the_extra_tables_print(capsys):
    from recipe.plan import main

    with pytest.raises(ValueError, match="unknown preset"):
        main(["llama-9", "--debug"])
    main(["llama-2-70b", "--offload", "--gpu", "rtx4090", "--published", "--nodes", "2", "--gpus-per-node", "2"])
    out = capsys.readouterr().out
    assert "time on RTX 4090" in out and "published s/step" in out and "verdict:" in out
