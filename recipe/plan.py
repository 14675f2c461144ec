"""The memory planner: how many bytes each rank holds while fine-tuning a Llama with QLoRA + FSDP.

    python -m recipe.plan llama-2-70b --world-size 2 --gpu-gib 24 --batch-size 2 --seq-len 2048 \
        --rank 64 --offload                              # checkpointing on unless --no-activation-checkpointing
    python -m recipe.plan path/to/config.json ...      # any Hugging Face Llama config

Pure arithmetic on the config's numbers, one line per kind of memory (chapter 7 explains each):

* persistent (held for the whole run): this rank's 1/world share of every sharding unit -- the NF4
  codes (1/2 byte per weight), their absmax constants (1 byte per 64 weights with double quantization,
  plus an fp32 scale per 256 of those: QLoRA paper, section 3), the unquantized tensors (embeddings,
  norms, lm_head) -- and the LoRA parameters' fp32 master copy and two AdamW moments (12 bytes per
  trainable parameter, divided by the world size: ZeRO-3, Rajbhandari et al. 2020, eq. 1; the 4-byte
  fp32 gradient lives from backward to the optimizer step and is counted in those phases).
  With ``offload`` these live in CPU memory instead.
* transient: what one step adds, phase by phase (``recipe/phases.py``): the forward at the loss (the
  saved activations, the logits and cross-entropy's fp32 copies), the backward at the loss, the
  last layer's backward (its recomputation with checkpointing, the gathered layer and the prefetched
  one, one dequantized weight, the gradients flowing), the optimizer (the LoRA gradients). On a GPU the
  dequantized weight is a per-call temporary; on the CPU (``Setup.device="cpu"``) ``nf4.Linear4bit``
  writes it into one reused workspace the size of the largest linear, kept from the first forward on,
  so it is live in every phase, and each call adds only its scratch. The peak is
  the persistent bytes plus the largest phase -- not the sum of every term, which are never all alive
  at once -- and the table names the phase and lists what is live in it.

Two peaks are reported: *allocated* (what ``torch.cuda.max_memory_allocated`` reads, what the phases
add up to) and *reserved* (``torch.cuda.max_memory_reserved``: allocated + ``FRAGMENTATION``, an
assumption). ``fits`` compares the reserved estimate with ``Setup.gpu_bytes``, which
``recipe.device.memory_budget`` sets from the GPU's free memory after start-up minus a stated
headroom. With ``offload`` the shards live in pinned CPU memory, one exactly sized arena per rank.

Units are the decoder layers, the embedding and the lm_head (each gathered only while it runs); the
root keeps the final norm. ``python -m recipe.measure --preset llama-2-7b`` checks each phase and each
component against a real run (``recipe/phase_memory.py``); ``tests/test_recipe_plan.py`` checks the
arithmetic by hand and the phases on the bundled model. The command line (``recipe/plan_cli.py``)
also predicts step time (``recipe/timemodel.py``) and compares full with hybrid sharding
(``recipe/links.py``).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import llama

from .phases import layer_activation_bytes, phase_bytes  # noqa: F401  (layer_activation_bytes: re-exported)

GiB = 1024 ** 3
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP
DQ_OFFSET_BYTES = 4               # double quant: the fp32 mean subtracted from the absmax before quantizing it


def llama_config(config) -> llama.LlamaConfig:
    """The model's numbers from a preset name, a config.json path or checkpoint directory, a Hugging Face
    config dict, or a ``llama.LlamaConfig`` itself."""
    if isinstance(config, llama.LlamaConfig):
        return config
    if isinstance(config, dict) or Path(config).exists():
        return llama.LlamaConfig.from_hf(config)
    return llama.LlamaConfig.preset(str(config))


def linear_shapes(config: llama.LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the seven projections of one decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


@dataclasses.dataclass(frozen=True)
class Setup:
    """How the model is trained; defaults are the reference 70B run (QLoRA + FSDP, 2 x 24 GB)."""
    world_size: int = 2
    gpu_bytes: int = 24 * GiB
    batch_size: int = 1
    seq_len: int = 2048
    rank: int = 64
    target_modules: tuple[str, ...] = ALL_LINEAR
    dora: bool = False
    activation_checkpointing: bool = True
    offload: bool = False
    quantize: bool = True          # False: the frozen base stays in compute_bytes (plain LoRA)
    compute_bytes: int = 2         # bf16 on GPU; 4 for fp32
    block_size: int = 64
    double_quant: bool = True
    prefetch: bool = True
    device: str = "cuda"           # "cpu": nf4's CPU dequantization workspace and scratch instead

    def __post_init__(self):
        for name in ("world_size", "gpu_bytes", "batch_size", "seq_len", "rank", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.target_modules) - set(ALL_LINEAR))
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {ALL_LINEAR}, got {unknown or '()'}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.compute_bytes not in (2, 4):
            raise ValueError(f"compute_bytes must be 2 (bf16) or 4 (fp32), got {self.compute_bytes}")


def quantized_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """(code bytes, absmax bytes) of one ``nf4.QuantizedWeight``: two codes per byte; one absmax per block,
    fp32, or with double quantization 8 bits per block plus an fp32 scale per 256 blocks and the fp32
    offset. The code books are constants of the ``nf4`` package, not stored with each weight (bitsandbytes'
    quant state carries them: 1,088 more bytes per weight)."""
    blocks = math.ceil(numel / block_size)
    if double_quant:
        return math.ceil(numel / 2), blocks + 4 * math.ceil(blocks / 256) + DQ_OFFSET_BYTES
    return math.ceil(numel / 2), 4 * blocks


def lora_parameters(shape: llama.LlamaConfig, setup: Setup) -> int:
    """Trainable parameters: r * (in + out) per target linear (A is [r, in], B is [out, r]), plus the
    DoRA magnitude vector (out) when enabled, in every layer."""
    per_layer = sum(setup.rank * (i + o) + (o if setup.dora else 0)
                    for name, (o, i) in linear_shapes(shape).items() if name in setup.target_modules)
    return per_layer * shape.num_hidden_layers


# The components the phases are made of; recipe.phase_memory files measured storages under the same names.
PERSISTENT_ROWS = ("NF4 codes", "frozen weights", "absmax", "embeddings", "LoRA fp32")
FRAGMENTATION = 0.05   # reserved / allocated - 1 assumed for the caching allocator (see ``Plan.reserved_bytes``)


@dataclasses.dataclass
class Plan:
    """Rows of (name, bytes per rank, where, what); ``phases``: {phase: {component: bytes}} of what is live
    together at that phase's peak on the device, on top of the persistent rows. The device peak
    (``peak_gpu_bytes``, what ``torch.cuda.max_memory_allocated`` reads) is the persistent bytes plus
    the largest phase, not the sum of every row: a step's logits, recomputed layer and gradients are
    never all alive at once."""
    shape: llama.LlamaConfig
    setup: Setup
    rows: list[tuple[str, int, str, str]]
    phases: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def total(self, where: str) -> int:
        return sum(b for _, b, w, _ in self.rows if w == where)

    @property
    def persistent_device_bytes(self) -> int:
        return sum(b for n, b, w, _ in self.rows if w == "device" and n.startswith(PERSISTENT_ROWS))

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda phase: sum(self.phases[phase].values()))

    @property
    def peak_gpu_bytes(self) -> int:
        """Allocated bytes at the step's peak: persistent + the largest phase."""
        return self.persistent_device_bytes + sum(self.phases[self.peak_phase].values())

    @property
    def reserved_bytes(self) -> int:
        """What the caching allocator holds at the peak (``torch.cuda.max_memory_reserved``): the allocated
        peak plus ``FRAGMENTATION`` for blocks rounded up and split segments that cannot be reused. An
        assumption, not yet measured on a GPU; ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
        (see ``recipe.device.memory_budget``) keeps it small for a loop whose sizes repeat every step."""
        return int(self.peak_gpu_bytes * (1 + FRAGMENTATION))

    @property
    def fits(self) -> bool:
        """The reserved estimate against the budget (``Setup.gpu_bytes``: free memory after start-up
        minus a headroom, ``recipe.device.memory_budget``)."""
        return self.reserved_bytes <= self.setup.gpu_bytes

    def table(self) -> str:
        s = self.setup
        head = (f"plan: {s.world_size} ranks x {s.gpu_bytes / GiB:.1f} GiB, batch {s.batch_size} x seq "
                f"{s.seq_len}, LoRA r={s.rank} on {','.join(s.target_modules)}, "
                f"{'NF4' if s.quantize else f'{8 * s.compute_bytes}-bit'} base, "
                f"checkpointing {'on' if s.activation_checkpointing else 'off'}, "
                f"offload {'on' if s.offload else 'off'}")
        lines = [head, f"{'per rank':<34}{'MiB':>10}  where   what", "-" * 100]
        lines += [f"{name:<34}{b / 2**20:>10.1f}  {where:<7} {what}" for name, b, where, what in self.rows]
        lines.append("-" * 100)
        for phase, parts in self.phases.items():
            live = " + ".join(f"{k} {v / 2**20:.0f}" for k, v in parts.items() if v)
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"{'phase: ' + phase:<34}{sum(parts.values()) / 2**20:>10.1f}  = {live}{mark}")
        lines.append(f"{'peak allocated on the device':<34}{self.peak_gpu_bytes / 2**20:>10.1f}  = persistent "
                     f"{self.persistent_device_bytes / 2**20:.0f} + phase '{self.peak_phase}'")
        lines.append(f"{'peak reserved (compared)':<34}{self.reserved_bytes / 2**20:>10.1f}  = {self.reserved_bytes / GiB:.2f} "
                     f"GiB of {s.gpu_bytes / GiB:.1f} GiB budget: {'fits' if self.fits else 'DOES NOT FIT'}")
        if self.total("cpu"):
            lines.append(f"{'held in CPU memory (offload)':<34}{self.total('cpu') / 2**20:>10.1f}  = "
                         f"{self.total('cpu') / GiB:.2f} GiB, pinned memory included")
        return "\n".join(lines)


PINNED_ALIGN = 64  # bytes: sharding's offload arena starts every slice on a cache line (sharding/offload.py)


def pinned_bytes(shard_sizes) -> int:
    """Pinned host memory for offloaded shards: ``sharding`` slices one exactly sized arena per rank and
    page-locks it once, each slice (a flat group's shard) rounded up to ``PINNED_ALIGN`` bytes -- not
    PyTorch's pinned caching allocator, which would round every allocation up to a power of two."""
    return sum(-(-n // PINNED_ALIGN) * PINNED_ALIGN for n in shard_sizes if n > 0)


def unit_bytes(shape: llama.LlamaConfig, setup: Setup) -> dict[str, int]:
    """Full (unsharded) bytes of the sharding units' parts: one decoder layer's frozen ``codes`` (the
    weights themselves without quantization), ``absmax`` and ``norms``, its LoRA parameter count
    ``lora_params``, the whole gathered decoder ``layer`` (those four, LoRA in the compute dtype), the
    ``embedding`` and the ``head`` (0 when tied to the embedding)."""
    c, linears = setup.compute_bytes, linear_shapes(shape)
    if setup.quantize:
        codes, absmax = map(sum, zip(*(quantized_bytes(o * i, setup.block_size, setup.double_quant)
                                       for o, i in linears.values())))
    else:
        codes, absmax = c * sum(o * i for o, i in linears.values()), 0
    embedding, norms = shape.vocab_size * shape.hidden_size * c, 2 * shape.hidden_size * c
    lora_params = lora_parameters(shape, setup) // shape.num_hidden_layers
    return {"codes": codes, "absmax": absmax, "norms": norms, "lora_params": lora_params,
            "layer": codes + absmax + norms + lora_params * c, "embedding": embedding,
            "head": 0 if shape.tie_word_embeddings else embedding}


def plan(config, setup: Setup | None = None) -> Plan:
    """Per-rank memory of fine-tuning ``config`` (see ``llama_config``) under ``setup``."""
    shape = llama_config(config)
    setup = setup or Setup()
    w, h, n_layers = setup.world_size, shape.hidden_size, shape.num_hidden_layers
    units = unit_bytes(shape, setup)
    codes, absmax, norms, embedding, head = (units[k] for k in ("codes", "absmax", "norms", "embedding", "head"))
    lora_layer, layer_unit, c = units["lora_params"], units["layer"], setup.compute_bytes

    def shard(nbytes: int) -> int:  # padded to a multiple of the world size, 1/world per rank
        return math.ceil(nbytes / w)

    resident = "cpu" if setup.offload else "device"
    trainable = lora_parameters(shape, setup)
    rows = [
        ("NF4 codes (shard)" if setup.quantize else "frozen weights (shard)", n_layers * shard(codes), resident,
         f"{n_layers} layers x 7 linears, 1/{w} each"),
        ("absmax + code tables (shard)", n_layers * shard(absmax), resident,
         "8-bit absmax + fp32 per 256 blocks" if setup.double_quant else "fp32 absmax per block"),
        ("embeddings, norms, lm_head (shard)", shard(embedding) + shard(head) + n_layers * shard(norms) + shard(h * c),
         resident, "unquantized, compute dtype"),
        ("LoRA fp32 master + AdamW", shard(12 * trainable), resident,
         f"{trainable / 1e6:.2f}M trainable params x 12 B / {w} (+ 4 B gradient in backward)"),
    ]
    if setup.offload:  # one arena slice per flat group: a layer's frozen and trainable groups, norms
        groups, whole = [shard(codes + absmax), shard(norms), shard(4 * lora_layer)], [shard(embedding), shard(head)]
        rounding = n_layers * (pinned_bytes(groups) - sum(groups)) + pinned_bytes(whole) - sum(whole)
        rows.append(("pinned alignment (offload)", rounding, "cpu", f"arena slices aligned to {PINNED_ALIGN} B"))
    order = [embedding, *[layer_unit] * n_layers] + ([head] if head else [])
    phases = phase_bytes(shape, setup, order)
    peak = max(phases.values(), key=lambda parts: sum(parts.values()))
    describe = {"gathered units": "all-gathered units live together (prefetch)",
                "dequantized weight": ("nf4's CPU workspace (largest linear, kept) + scratch" if setup.device == "cpu"
                                       else "the largest linear, one at a time"),
                "activations": "saved for backward" + (" (layer inputs)" if setup.activation_checkpointing else ""),
                "recompute": "one layer's activations, recomputed", "backward": "gradients flowing through one layer",
                "logits + loss": "logits and cross-entropy's fp32 copies"}
    rows += [(f"{name} (at the peak)", b, "device", describe[name]) for name, b in peak.items() if b]
    return Plan(shape, setup, rows, phases)


def main(argv=None) -> Plan:
    """``python -m recipe.plan``: see ``recipe.plan_cli``."""
    from .plan_cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    main()
