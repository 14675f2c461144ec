"""The memory planner's arithmetic, checked against numbers worked out by hand (recipe/plan.py)."""
import pytest
import torch

from recipe.plan import ALL_LINEAR, GiB, Setup, llama_config, lora_parameters, main, plan, quantized_bytes

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000)


def row(p, name):
    return next(b for n, b, _, _ in p.rows if n.startswith(name))


def test_nf4_bytes_of_one_weight():
    # 4096 weights: 2048 code bytes; 64 blocks -> 64 one-byte absmax + one fp32 scale (4) + the fp32 offset (4)
    assert quantized_bytes(4096, 64, double_quant=True) == (2048, 64 + 4 + 4)
    # without double quant: 64 fp32 absmax = 256 bytes
    assert quantized_bytes(4096, 64, double_quant=False) == (2048, 256)
    # odd counts round up: 65 weights -> 33 bytes, 2 blocks
    assert quantized_bytes(65, 64, double_quant=False) == (33, 8)


@pytest.mark.parametrize("numel, double_quant", [(4096, True), (4096, False), (65 * 300, True), (65, False)])
def test_nf4_bytes_are_what_nf4_stores(numel, double_quant):
    import nf4

    q = nf4.quantize(torch.randn(numel), block_size=64, double_quant=double_quant)
    stored = [t for t in (q.absmax, q.nested_absmax, q.offset) if t is not None]
    assert quantized_bytes(numel, 64, double_quant) == (q.packed.nbytes, sum(t.nbytes for t in stored))


def test_bits_per_parameter_of_a_70b_matrix_is_4_127():
    n = 8192 * 28672
    codes, absmax = quantized_bytes(n)
    assert 8 * (codes + absmax) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-4)


def test_lora_parameter_count_tiny_by_hand():
    # head_dim 16, kv width 32; r=8: q 8*(64+64), k,v 8*(64+32), o 8*(64+64), gate/up/down 8*(64+128)
    per_layer = 1024 + 768 + 768 + 1024 + 3 * 1536
    assert lora_parameters(llama_config(TINY), Setup(rank=8)) == 2 * per_layer
    assert lora_parameters(llama_config(TINY), Setup(rank=8, target_modules=("q_proj",))) == 2 * 1024
    # DoRA adds one magnitude per output feature: 64 for q_proj
    assert lora_parameters(llama_config(TINY), Setup(rank=8, target_modules=("q_proj",), dora=True)) == 2 * (1024 + 64)


def test_lora_parameter_count_llama2_70b_r64_all_linear():
    # the number PEFT prints for Llama-2-70B, r=64, all linear layers: 828,375,040
    assert lora_parameters(llama_config(LLAMA2_70B), Setup(rank=64)) == 828_375_040


def test_70b_nf4_codes_are_half_a_byte_per_linear_weight_split_over_ranks():
    p = plan(LLAMA2_70B, Setup(world_size=2))
    linear_weights = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)  # 68,451,041,280
    assert linear_weights == 68_451_041_280
    assert row(p, "NF4 codes") == linear_weights // 2 // 2
    # embeddings + lm_head (2 x 32000 x 8192) + 161 norms of 8192, in bf16, halved
    assert row(p, "embeddings") == (2 * 32000 * 8192 * 2) // 2 + 80 * (2 * 8192 * 2) // 2 + 8192 * 2 // 2


def test_sharded_rows_scale_with_world_size_and_activations_do_not():
    p2, p4 = plan(LLAMA2_70B, Setup(world_size=2)), plan(LLAMA2_70B, Setup(world_size=4))
    for name in ("NF4 codes", "absmax", "LoRA fp32"):
        assert row(p4, name) == pytest.approx(row(p2, name) / 2, rel=1e-6)
    assert p4.phases["forward"] == p2.phases["forward"]


@pytest.mark.parametrize("c", [2, 4])
def test_checkpointing_keeps_only_layer_inputs(c):
    from recipe.plan import layer_activation_bytes

    shape = llama_config(TINY)
    setup = dict(compute_bytes=c, batch_size=3, seq_len=5)
    on = plan(shape, Setup(activation_checkpointing=True, **setup))
    off = plan(shape, Setup(activation_checkpointing=False, **setup))
    one_layer = layer_activation_bytes(shape, Setup(**setup))
    # layers x tokens x hidden x bytes, plus the final norm's fp32 input
    assert on.phases["backward (loss)"]["activations"] == 2 * 3 * 5 * 64 * c + 3 * 5 * 64 * 4
    assert on.phases["backward (layers)"]["recompute"] == one_layer  # at the end of the last layer's recompute
    assert on.phases["backward (layers)"]["backward"] == 3 * 5 * 64 * c  # the gradient arriving at its output
    # every layer's saved tensors; in fp32 the norms' inputs are the (uncounted) layer inputs themselves
    assert off.phases["backward (loss)"]["activations"] == 2 * (one_layer + (3 * 5 * 64 * 4 if c == 4 else 0))
    assert off.phases["backward (layers)"].get("recompute", 0) == 0
    assert off.peak_gpu_bytes > on.peak_gpu_bytes


def test_peak_is_the_largest_phase_not_the_sum_of_every_term():
    p = plan(LLAMA2_70B, Setup(batch_size=2, seq_len=2048, offload=True))
    sums = {phase: sum(parts.values()) for phase, parts in p.phases.items()}
    assert p.peak_gpu_bytes == p.persistent_device_bytes + max(sums.values())
    assert p.peak_gpu_bytes < p.persistent_device_bytes + sum(sums.values())
    assert p.peak_phase == max(sums, key=sums.get)
    # the table lists the transient rows of the peak phase only, so the rows still add up to the peak
    assert p.total("device") == p.peak_gpu_bytes
    assert p.reserved_bytes > p.peak_gpu_bytes and p.fits == (p.reserved_bytes <= p.setup.gpu_bytes)


def test_offload_moves_shards_to_cpu_and_counts_pinned_alignment():
    on, off = plan(LLAMA2_70B, Setup(offload=True)), plan(LLAMA2_70B, Setup(offload=False))
    shards = row(off, "NF4 codes") + row(off, "absmax") + row(off, "embeddings") + row(off, "LoRA")
    assert on.total("cpu") == shards + row(on, "pinned alignment")
    assert 0 <= row(on, "pinned alignment") < 64 * (4 * 80 + 2)  # < 64 B per slice
    assert on.persistent_device_bytes == 0
    assert on.peak_gpu_bytes == off.peak_gpu_bytes - off.persistent_device_bytes  # the same phase peaks


def test_pinned_arena_slices_round_up_to_cache_lines():
    from recipe.plan import pinned_bytes

    assert pinned_bytes([1, 2, 64, 65, 1000, 1024, 0]) == 64 + 64 + 64 + 128 + 1024 + 1024


def test_reference_70b_run_on_two_24gb_gpus():
    """The reference run (Llama-2-70B, 2 x 24 GB, batch 2, ctx 2048, r=64 on q,k,v,gate,up,down,
    checkpointing, CPU offload) peaked at 14.92 GiB/GPU: the plan must fit it; without offload the 4-bit
    shards alone (16 GiB) plus the rest do not fit in 24 GiB."""
    targets = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    setup = dict(world_size=2, batch_size=2, seq_len=2048, rank=64, target_modules=targets)
    offloaded = plan("llama-2-70b", Setup(offload=True, **setup))
    assert offloaded.fits and offloaded.peak_gpu_bytes < 14.92 * GiB
    assert not plan("llama-2-70b", Setup(offload=False, **setup)).fits
    assert plan("llama-2-70b", Setup(offload=False, **{**setup, "world_size": 4})).fits  # 4 GPUs, no offload


def test_bad_setup_is_a_clear_error():
    with pytest.raises(ValueError, match="world_size"):
        Setup(world_size=0)
    with pytest.raises(ValueError, match="target_modules"):
        Setup(target_modules=("qkv",))
    with pytest.raises(ValueError, match="compute_bytes"):
        Setup(compute_bytes=3)
    with pytest.raises(ValueError, match="missing"):
        llama_config({"hidden_size": 8})


def test_command_line_prints_a_table(capsys):
    result = main(["llama-2-70b", "--batch-size", "2", "--offload"])
    out = capsys.readouterr().out
    assert "peak allocated on the device" in out and "peak reserved (compared)" in out and "fits" in out
    assert result.setup.target_modules == ALL_LINEAR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_activation_formula_equals_what_autograd_saves(dtype):
    """Count the bytes a real decoder layer with LoRA on every linear saves (saved_tensors_hooks)."""
    import llama
    import lora
    from llama.model import DecoderLayer, rotary_cos_sin
    from recipe.plan import layer_activation_bytes

    h, i, heads, kv, batch, seq, r = 64, 160, 4, 2, 2, 16, 4
    config = llama.LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=1, num_attention_heads=heads,
                               num_key_value_heads=kv, vocab_size=258)
    layer = DecoderLayer(config).to(dtype)
    lora.inject(layer, "all-linear", r=r, dtype=dtype)
    x = torch.randn(batch, seq, h, dtype=dtype, requires_grad=True)
    not_new = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in not_new:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, *rotary_cos_sin(config, seq, x.device, dtype))
    setup = Setup(batch_size=batch, seq_len=seq, rank=r, compute_bytes=x.element_size())
    assert layer_activation_bytes(llama_config(config), setup) == sum(saved.values())


def test_gathered_units_in_each_phase():
    """Forward in the last layer: it and the prefetched lm_head; backward of the last layer: it and the
    unit before it (the embedding when there is one layer); a tied embedding stays gathered all step."""
    from recipe.plan import unit_bytes

    setup = Setup(batch_size=1, seq_len=4, rank=4, activation_checkpointing=False)
    for layers in (1, 2):
        shape = llama_config({**TINY, "num_hidden_layers": layers, "vocab_size": 5000})
        units = unit_bytes(shape, setup)
        layer = units["codes"] + units["absmax"] + units["norms"] + units["lora_params"] * 2
        p = plan(shape, setup)
        assert p.phases["forward"]["gathered units"] == layer + units["head"]  # the larger moment here
        before = units["embedding"] if layers == 1 else layer
        assert p.phases["backward (layers)"]["gathered units"] in (layer + before, layer)
    tied = plan(llama_config({**TINY, "tie_word_embeddings": True}), setup)
    assert tied.phases["backward (loss)"]["gathered units"] == unit_bytes(tied.shape, setup)["embedding"]


def _measure_phases(rank, world, model, out, flags):
    from recipe.phase_memory import train_with_phase_memory

    return train_with_phase_memory(["--model", str(model), "--out", str(out), "--steps", "2", "--track-memory",
                                    "--eval-batches", "1", "--eval-every", "1000", "--save-every", "1000",
                                    "--no-progress", "--dtype", "fp32", "--rank", "4", *flags])


@pytest.mark.parametrize("world, checkpointing", [(1, False), (2, True)])
def test_planned_phases_match_a_measured_step_on_the_bundled_model(tmp_path, world, checkpointing):
    """Each phase's peak, and each component in it, planned vs counted by recipe.phase_memory in a real
    training step of the bundled tiny-llama (seq 256, batch 4, fp32: activations, gradients and logits
    dominate; nf4's CPU dequantization workspace is live in every phase). The check at real widths is
    ``python -m recipe.measure --preset llama-2-7b``."""
    import llama
    from distributed import run_on_ranks
    from recipe.build import DEFAULT_MODEL

    flags = ["--seq-len", "256", "--batch-size", "4"] + (["--activation-checkpointing"] if checkpointing else [])
    measured = run_on_ranks(_measure_phases, world, args=(DEFAULT_MODEL, tmp_path / "run", flags), timeout_s=300)[0]
    planned = plan(llama.LlamaConfig.from_hf(DEFAULT_MODEL),
                   Setup(world_size=world, batch_size=4, seq_len=256, rank=4, compute_bytes=4,
                         activation_checkpointing=checkpointing, device="cpu"))
    for phase in ("forward", "backward (loss)", "backward (layers)"):
        parts = {"persistent": planned.persistent_device_bytes, **planned.phases[phase]}
        assert sum(parts.values()) == pytest.approx(measured[phase]["total"], rel=0.05), phase
        for component, nbytes in parts.items():
            if nbytes > 0.05 * measured[phase]["total"]:  # the terms that matter at this phase
                assert nbytes == pytest.approx(measured[phase][component], rel=0.10), (phase, component)
    peak = max(("forward", "backward (loss)", "backward (layers)"), key=lambda p: measured[p]["total"])
    assert planned.peak_phase == peak
