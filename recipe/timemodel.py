"""How long one training step takes: FLOPs and bytes of a QLoRA + FSDP step, divided by a machine's rates.

    python -m recipe.plan llama-2-70b --offload --gpu rtx3090      # a GPU from the datasheet table below
    python -m recipe.plan --cpu ...                                # this machine, measured (recipe.microbench)

Work per rank and step (one micro-batch of b x s tokens; ``step_work``):

* FLOPs. A linear of o x i weights costs 2 o i per token forward. The frozen base needs no weight
  gradient, so its backward is the input gradient only: 1x its forward. LoRA (r x i and o x r) costs
  2 r (i + o) forward and 2x that backward (input and weight gradients), at the adapters' own measured
  rate (thin r-wide matmuls run far below the large ones' rate on a CPU). Causal attention costs
  2 s h per token forward (QK^T and AV, half the square) and 2x that backward; with an explicit mask
  (packed rows, the main job's instruction data) SDPA computes the whole square, twice that
  (``attention_flops``), at its own measured rate (small head dims run far below the matmul rate on a
  CPU). lm_head (frozen) costs 2 h v forward and the same backward. Checkpointing recomputes every
  layer's forward once.
* NF4 dequantization: each linear is dequantized once per forward, recompute and backward; each time
  it reads its codes and absmax (~0.52 B per weight) and writes c bytes (the matmul's read of them
  is part of the matmul).
* Elementwise work (norms, casts, rotary, SiLU, residuals, the loss; every operator that is neither a
  matmul, attention, a view, an allocation nor inside NF4 dequantization) is memory-bound: the bytes its
  operators read + write, counted by ``recipe.opcount`` (the sizes of each operator's tensor inputs and
  outputs) and written per phase in tokens t = b s, layers n, hidden h, intermediate i and vocab v
  (``elementwise_by_phase``, bf16 compute; x c / 2 for other compute bytes c):

      phase       bytes                                         (main job: t = 1024, n = 6)
      forward     t (n (125.7 h + 18 i) + 109 h + 18 v)         307 MB
      recompute   t n (125.7 h + 18 i)                          (checkpointing only)
      backward    t (n (279.4 h + 24 i) + 30 v)                 549 MB

  The hidden terms hold every tensor not i or v wide (hidden, KV and LoRA widths, norms' statistics, the
  mask); the backward's once-per-model part is folded into its per-layer term (only the 6-layer model
  was counted). Within 2% of the count at 1 and 2 ranks, with and without checkpointing. Priced at the
  elementwise bandwidth (``recipe.microbench``: a norm, a residual add and a SwiGLU product at the step's
  activation size, in the compute dtype, its bytes counted the same way); a GPU's datasheet entry has
  none, so its copy rate (80% of memory bandwidth): there this work is bound by HBM and adds to the step.
* Collectives: the all-gather and reduce-scatter payloads of ``recipe.links.step_payloads``; a ring
  puts (w-1)/w of each on the wire, at the gather bandwidth between ranks.
* Offload: every shard crosses PCIe host->device once per gather (forward and backward), the LoRA
  gradients device->host once, and AdamW runs on the CPU over the fp32 state (28 B per parameter).
* Overhead, the fixed cost per call (``overhead_seconds``): ATen operators x ``op_seconds`` (a tiny
  ``add``) + C++-to-Python callbacks (autograd Function forwards and backwards, hooks) x
  ``callback_seconds`` + collectives x ``collective_seconds`` (a 1-element all-gather's latency). The
  counts are ``dispatch_by_phase``: a formula in layers n and LoRA-wrapped linears per layer k, per
  phase, fitted to and tested against what ``recipe.opcount`` counts on the bundled model (one torch
  thread per rank; operators, callbacks and collectives exact except the data phase, whose few operators
  depend on the rows; Python calls, ``python_seconds`` each, within 5%; the counter's own calls excluded):

      phase       operators            Python calls            callbacks        collectives
      data        172                  1146                    0                1
      forward     n (368 + 9 k) + 71   n (2242 + 105 k) + 451  n (8 + k) + 1    2 n + 3
      recompute   n (249 + 20 k) - 18  n (3053 + 105 k) + 31   n (58 + k) - 8   0   (inside backward)
      backward    n (386 + 23 k) - 77  n (2183 + 121 k) - 366  11 n             3 n + 1
      optimizer   13 n + 18            60 n + 268              0                1

  plus 4 operators per dequantization for each 2**20-value chunk of a weight beyond its first. The
  operators' per-k terms of the recompute and backward are refitted on the 6-layer model at k = 1 and 7
  (exact at k = 7, within 1% at k = 1). The main job's step (n = 6, k = 7) makes 6,130 operators, ~38,000 Python calls, 157 callbacks and 36
  collectives per rank.

Overlap assumptions: all-gathers and reduce-scatters overlap compute (the next unit is prefetched
asynchronously), so only the part longer than compute and attention shows; dequantization, elementwise
work, the optimizer and the offload copies do not overlap (they run on the compute stream; the sharder's
offload copies have no side stream). On a CPU the overhead is paid in line (the same thread dispatches
and computes); on a GPU the host runs ahead of the device's queue, so it shows only where longer than
the device's work. CPU: step = compute + attention + dequantize + elementwise + offload + optimizer +
overhead + max(0, collectives - compute - attention); GPU: the same with max(0, overhead - the rest).

GPU datasheet numbers (dense bf16 tensor FLOP/s with fp32 accumulation, memory bandwidth, host link):

    GPU         bf16 TFLOP/s  memory GB/s  host link GB/s  between GPUs GB/s   source
    rtx3090         71           936        32 (PCIe 4 x16)  32 (PCIe)        NVIDIA Ampere GA102 whitepaper, app. A
    rtx4090        165.2        1008        32 (PCIe 4 x16)  32 (PCIe)        NVIDIA Ada Lovelace whitepaper, app. A
    a100-40g       312          1555        32 (PCIe 4 x16)  300 (NVLink 3)   NVIDIA A100 datasheet (SXM4 40GB)
    h100           989          3350        64 (PCIe 5 x16)  450 (NVLink 4)   NVIDIA H100 datasheet (SXM5)

Achieved fractions (assumptions, not measured: no GPU has run this code): 70% of peak FLOP/s for
these large bf16 matmuls, 80% of memory bandwidth, 80% of the host and inter-GPU links.

The reference system's published Llama-2-70B runs (2 GPUs, batch 2 x 2048 per GPU, LoRA on all linears,
checkpointing, CPU offload; 1,024 samples, so 256 steps of 4 sequences): 2 x RTX 3090 in 11,795 s
(46.1 s/step), 2 x RTX 4090 in 4,399 s (17.2 s/step). ``published_check`` (``python -m recipe.plan
--published``) predicts 40.8 s (0.89x) and 20.4 s (1.19x). The linears' compute is 84% and 73% of the
two predictions, so the residual is mostly the one achieved fraction (70%) assumed for both cards: with
everything else as modelled, the published times mean ~61% of the RTX 3090's 71 TFLOP/s and ~90% of the
RTX 4090's 165; the published 3090/4090 ratio (2.68x) is larger than the datasheets' (2.33x), which no
single fraction can match. The counted elementwise bytes (2.0 TB per rank and step at 70B width, bound by
HBM: 2.7 s and 2.5 s) are a part of that residual's size only. The reference system also runs another
stack (Hugging Face attention and bitsandbytes kernels, FSDP's own offload), whose copies may overlap
differently from the serial ones assumed here. The host overhead there (~126,000 operators, ~763,000
Python calls, ~7,100 callbacks, 406 collectives per step at the assumed per-call costs: 1.65 s) hides
behind the GPUs' work; paid in line it would be 4.0% and 8.1% of the steps.

On this 2-core CPU (``--cpu``; ``python -m recipe.timecheck`` for the bundled model, which measures the
rates and the steps in the same processes; all measured while the machine was shared): the main job
(batch 4 x 256, packed rows) is predicted at 0.92x / 0.94x of its measured CPU time per step at 1 / 2
ranks, and 0.90x / 0.78x of its wall-clock step (two earlier runs: 0.93x / 0.99x and 0.90x / 0.85x by
CPU time). The LoRA adapters (rank 8) run at 27-29 GFLOP/s of CPU time against 201-206 for the large
matmuls: they are a third of the predicted compute. The elementwise bytes are 13% of the prediction
(18-20 GB/s; timed operator by operator inside the step, ~12), the overhead 6-10%. A Llama-2-7B-width
slice (1 layer, batch 1 x 2048, 2 ranks, bf16, ``--packed``) was
predicted at 111 s/step against 116 s/step measured (0.96x) before the elementwise bytes (~7.9 GB
there) and the adapters' rate were measured (not re-measured since).
"""
from __future__ import annotations

import dataclasses

from .links import step_payloads
from .plan import Setup, linear_shapes, llama_config, lora_parameters, unit_bytes

MATMUL_FRACTION, MEMORY_FRACTION, LINK_FRACTION = 0.7, 0.8, 0.8
HOST_ADAMW_BYTES_PER_S = 20e9   # AdamW on the host: a desktop's dual-channel DDR4/5, assumed
# What a step dispatches per rank and phase (module doc; ``recipe.opcount``, torch 2.13, CPU path, one torch
# thread): (per decoder layer, per LoRA-wrapped linear of a layer, once per model).
OPS = {"data": (0, 0, 172), "forward": (368, 9, 71), "recompute": (249, 20, -18),
       "backward": (386, 23, -77), "optimizer": (13, 0, 18)}
PYTHON = {"data": (0, 0, 1146), "forward": (2242, 105, 451), "recompute": (3053, 105, 31),   # Python calls
          "backward": (2183, 121, -366), "optimizer": (60, 0, 268)}
CALLBACKS = {"forward": (8, 1, 1), "recompute": (65 - 7, 1, -8), "backward": (11, 0, 0)}  # C++ -> Python calls
COLLECTIVES = {"data": (0, 0, 1), "forward": (2, 0, 3), "backward": (3, 0, 1), "optimizer": (0, 0, 1)}
# Memory-bound bytes per token and phase (module doc): (per layer x h, per layer x i, once x h, once x v).
ELEMENTWISE = {"forward": (125.7, 18, 109, 18), "recompute": (125.7, 18, 0, 0), "backward": (279.4, 24, 0, 30)}


@dataclasses.dataclass(frozen=True)
class Machine:
    """Achievable rates of one rank: FLOP/s of large matmuls, bytes/s of copies in device memory, of NF4
    dequantization (bytes read + written), host<->device (None: the CPU computes in host memory), of the
    all-gather between ranks; FLOP/s of attention and of the LoRA adapters (None: the matmul rate); bytes/s of the step's elementwise
    operators at its activation size (None: the copy rate); and the fixed seconds per call:
    per ATen operator, per Python function call, per C++-to-Python callback (an autograd Function's forward
    or backward, a hook), per collective (its latency)."""
    name: str
    matmul_flops: float
    copy_bytes_per_s: float
    dequantize_bytes_per_s: float
    host_link_bytes_per_s: float | None
    gather_bytes_per_s: float
    op_seconds: float = 10e-6
    attention_flops: float | None = None
    elementwise_bytes_per_s: float | None = None
    adapter_flops: float | None = None
    python_seconds: float = 0.3e-6
    callback_seconds: float = 20e-6
    collective_seconds: float = 50e-6
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes ``recipe.microbench`` measures a machine at: the step's linears (tokens, in, out), its
    attention (batch, heads, seq, head_dim, masked: an explicit mask rather than ``is_causal``), its
    activations (tokens, hidden, intermediate) and one layer's LoRA adapters (tokens, in, out, r)."""
    linears: tuple[tuple[int, int, int], ...]
    attention: tuple[int, int, int, int, bool]
    activations: tuple[int, int, int]
    adapters: tuple[tuple[int, int, int, int], ...] = ()


def workload_of(config, setup: Setup, masked: bool = False) -> Workload:
    shape = llama_config(config)
    tokens = setup.batch_size * setup.seq_len
    linears = tuple((tokens, i, o) for o, i in linear_shapes(shape).values()) + ((tokens, shape.hidden_size, shape.vocab_size),)
    adapters = tuple((tokens, i, o, setup.rank) for name, (o, i) in linear_shapes(shape).items() if name in setup.target_modules)
    return Workload(linears, (setup.batch_size, shape.num_attention_heads, setup.seq_len, shape.head_dim, masked),
                    (tokens, shape.hidden_size, shape.intermediate_size), adapters)


def datasheet(name: str, tflops: float, memory_gbs: float, host_gbs: float, peer_gbs: float) -> Machine:
    memory = memory_gbs * 1e9 * MEMORY_FRACTION
    return Machine(name, tflops * 1e12 * MATMUL_FRACTION, memory, memory, host_gbs * 1e9 * LINK_FRACTION,
                   peer_gbs * 1e9 * LINK_FRACTION, source="datasheet x assumed fractions")


GPUS = {"rtx3090": datasheet("RTX 3090", 71, 936, 32, 32), "rtx4090": datasheet("RTX 4090", 165.2, 1008, 32, 32),
        "a100-40g": datasheet("A100 40GB", 312, 1555, 32, 300), "h100": datasheet("H100 SXM", 989, 3350, 64, 450)}
PUBLISHED = {"rtx3090": 11795 / 256, "rtx4090": 4399 / 256}  # s/step of the reference system's 70B runs
REFERENCE = Setup(world_size=2, batch_size=2, seq_len=2048, rank=64, offload=True, activation_checkpointing=True,
                  target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))


def step_flops(config, setup: Setup) -> dict[str, float]:
    """FLOPs per rank and step: forward, recompute (checkpointing) and backward."""
    shape = llama_config(config)
    tokens, h, n = setup.batch_size * setup.seq_len, shape.hidden_size, shape.num_hidden_layers
    base = 2 * sum(o * i for o, i in linear_shapes(shape).values())
    lora = 2 * lora_parameters(shape, setup) / n
    attention = 2 * setup.seq_len * h
    head = 2 * h * shape.vocab_size
    layer_forward = n * tokens * (base + lora + attention)
    return {"forward": layer_forward + tokens * head,
            "recompute": layer_forward if setup.activation_checkpointing else 0.0,
            "backward": n * tokens * (base + 2 * lora + 2 * attention) + tokens * head}


def attention_flops(config, setup: Setup, masked: bool = False) -> float:
    """Attention FLOPs per rank and step as SDPA executes them: the causal half counted in ``step_flops``
    (forward, recompute, 2x backward), doubled with an explicit ``masked`` (packed rows: the whole square)."""
    shape = llama_config(config)
    tokens = setup.batch_size * setup.seq_len
    passes = 4 if setup.activation_checkpointing else 3
    return (2 if masked else 1) * passes * shape.num_hidden_layers * tokens * 2 * setup.seq_len * shape.hidden_size


def dispatch_by_phase(config, setup: Setup) -> dict[str, dict[str, int]]:
    """Operators, C++-to-Python callbacks and collectives one rank dispatches per step, per phase (the counts
    above: layers x (per layer + per LoRA-wrapped linear x their number) + once per model; checkpointing adds
    the "recompute" phase, which runs inside the backward; each dequantization's chunks beyond the first)."""
    from nf4.fast_path import chunk_values
    import torch

    shape = llama_config(config)
    n, k = shape.num_hidden_layers, sum(name in setup.target_modules for name in linear_shapes(shape))
    phases = ("data", "forward", "backward", "optimizer") + (("recompute",) if setup.activation_checkpointing else ())
    chunk = chunk_values(torch.device(setup.device))
    extra_chunks = n * sum(-(-o * i // chunk) - 1 for o, i in linear_shapes(shape).values()) if setup.quantize else 0
    tables = {"ops": OPS, "python": PYTHON, "callbacks": CALLBACKS, "collectives": COLLECTIVES}
    counts = {p: {kind: n * (t[p][0] + k * t[p][1]) + t[p][2] if p in t else 0 for kind, t in tables.items()}
              for p in phases}
    for p in set(phases) & {"forward", "backward", "recompute"}:
        counts[p]["ops"] += 4 * extra_chunks
    return counts


def elementwise_by_phase(config, setup: Setup) -> dict[str, float]:
    """Bytes the memory-bound operators of a step read + write per rank, per phase (``ELEMENTWISE``): with
    tokens t = b s, n layers, t (n (a h + b i) + c h + d v), scaled by compute bytes / 2."""
    shape = llama_config(config)
    n, tokens = shape.num_hidden_layers, setup.batch_size * setup.seq_len
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    phases = ("forward", "backward") + (("recompute",) if setup.activation_checkpointing else ())
    return {p: setup.compute_bytes / 2 * tokens * (n * (a * h + b * i) + c * h + d * v)
            for p, (a, b, c, d) in ELEMENTWISE.items() if p in phases}


def step_dispatch(config, setup: Setup) -> dict[str, int]:
    """``dispatch_by_phase`` summed over the phases."""
    phases = dispatch_by_phase(config, setup).values()
    return {kind: sum(p[kind] for p in phases) for kind in ("ops", "python", "callbacks", "collectives")}


def step_work(config, setup: Setup, masked: bool = False) -> dict[str, float]:
    """FLOPs and bytes per rank and step (see the module doc)."""
    shape = llama_config(config)
    n, w, c = shape.num_hidden_layers, setup.world_size, setup.compute_bytes
    passes = 3 if setup.activation_checkpointing else 2
    weights = sum(o * i for o, i in linear_shapes(shape).values()) * n
    units = unit_bytes(shape, setup)
    per_weight_read = (units["codes"] + units["absmax"]) / (weights / n) if setup.quantize else 0.0
    payload = step_payloads(shape, setup)
    trainable = lora_parameters(shape, setup) / w
    shard = (n * (units["codes"] + units["absmax"] + units["norms"] + 4 * units["lora_params"])
             + units["embedding"] + units["head"]) / w
    attention = attention_flops(shape, setup, masked=False)
    adapters = lora_parameters(shape, setup) * setup.batch_size * setup.seq_len * 2 * (passes + 1)
    return {"flops": sum(step_flops(shape, setup).values()) - attention, "adapter_flops": adapters,
            "attention_flops": attention_flops(shape, setup, masked),
            "dequantize_bytes": passes * weights * (per_weight_read + c) if setup.quantize else 0.0,
            "elementwise_bytes": sum(elementwise_by_phase(shape, setup).values()),
            "collective_bytes": (w - 1) / w * (payload["all_gather"] + payload["reduce_scatter"]),
            "offload_bytes": (2 * shard + 4 * trainable) if setup.offload else 0.0,
            "optimizer_bytes": 28 * trainable, **step_dispatch(shape, setup)}


def step_seconds(config, setup: Setup, machine: Machine, masked: bool = False) -> dict[str, float]:
    """Seconds per step by kind of work, and the total under the overlap assumptions above (``masked``: the
    batches carry an explicit attention mask, as packed rows do)."""
    work = step_work(config, setup, masked)
    t = {"compute": (work["flops"] - work["adapter_flops"]) / machine.matmul_flops
                    + work["adapter_flops"] / (machine.adapter_flops or machine.matmul_flops),
         "attention": work["attention_flops"] / (machine.attention_flops or machine.matmul_flops),
         "dequantize": work["dequantize_bytes"] / machine.dequantize_bytes_per_s,
         "elementwise": work["elementwise_bytes"] / (machine.elementwise_bytes_per_s or machine.copy_bytes_per_s),
         "collectives": work["collective_bytes"] / machine.gather_bytes_per_s if setup.world_size > 1 else 0.0,
         "offload": work["offload_bytes"] / machine.host_link_bytes_per_s if machine.host_link_bytes_per_s else 0.0,
         "optimizer": work["optimizer_bytes"] / (HOST_ADAMW_BYTES_PER_S if setup.offload else machine.copy_bytes_per_s),
         "overhead": overhead_seconds(work, machine)}
    exposed = max(0.0, t["collectives"] - t["compute"] - t["attention"])
    serial = sum(v for k, v in t.items() if k not in ("collectives", "overhead"))
    # a GPU runs behind the host's queue, so the host's fixed costs hide under its work; a CPU pays them in line
    shown = max(0.0, t["overhead"] - serial) if machine.host_link_bytes_per_s else t["overhead"]
    t["step"] = serial + exposed + shown
    return t


def overhead_seconds(work: dict, machine: Machine) -> float:
    """Fixed costs of a step: operators x ``op_seconds`` + Python calls x ``python_seconds`` + callbacks x
    ``callback_seconds`` + collectives x ``collective_seconds``."""
    return (work["ops"] * machine.op_seconds + work["python"] * machine.python_seconds
            + work["callbacks"] * machine.callback_seconds + work["collectives"] * machine.collective_seconds)


def time_table(config, setup: Setup, machine: Machine, masked: bool = False) -> str:
    t = step_seconds(config, setup, machine, masked)
    tokens = setup.batch_size * setup.seq_len * setup.world_size
    parts = ", ".join(f"{k} {v:.3g}" for k, v in t.items() if k != "step")
    hidden = "hidden behind the device's work" if machine.host_link_bytes_per_s else "paid in line"
    return (f"time on {machine.name} ({machine.source}): {t['step']:.3g} s/step, {tokens / t['step']:.0f} tokens/s "
            f"over {setup.world_size} ranks\n  seconds: {parts} (collectives overlap compute; overhead {hidden}; "
            f"the rest does not overlap)")


def published_check() -> str:
    """Predicted vs published s/step for the reference system's Llama-2-70B runs (``REFERENCE``), and the
    fixed per-call costs the prediction leaves hidden behind the GPUs' work."""
    lines = [f"Llama-2-70B, 2 GPUs, batch 2 x 2048 per GPU, r=64, checkpointing, CPU offload",
             f"{'GPU':<10}{'predicted s/step':>18}{'published s/step':>18}{'ratio':>8}"]
    times = {name: step_seconds("llama-2-70b", REFERENCE, GPUS[name]) for name in PUBLISHED}
    for name, published in PUBLISHED.items():
        predicted = times[name]["step"]
        lines.append(f"{name:<10}{predicted:>18.1f}{published:>18.1f}{predicted / published:>8.2f}")
    d = step_dispatch("llama-2-70b", REFERENCE)
    overhead = times["rtx3090"]["overhead"]
    lines.append(f"host overhead ({d['ops']:,} operators, {d['python']:,} Python calls, {d['callbacks']:,} callbacks, "
                 f"{d['collectives']} collectives per step): {overhead:.2f} s, hidden behind the GPUs' work; paid in line it would be "
                 + " and ".join(f"{overhead / t['step']:.1%} of the {n} step" for n, t in times.items()))
    return "\n".join(lines)
