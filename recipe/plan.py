"""The memory planner: how many bytes each rank holds while fine-tuning a Llama with QLoRA + FSDP.

    python -m recipe.plan llama-2-70b --world-size 2 --gpu-gib 24 --batch-size 2 --seq-len 2048 \
        --rank 64 --activation-checkpointing --offload
    python -m recipe.plan path/to/config.json ...      # any Hugging Face Llama config

Pure arithmetic on the config's numbers, one line per kind of memory (chapter 7 explains each):

* persistent (held for the whole run): this rank's 1/world share of every sharding unit -- the NF4
  codes (1/2 byte per weight), their absmax constants (1 byte per 64 weights with double quantization,
  plus an fp32 scale per 256 of those: QLoRA paper, section 3), the unquantized tensors (embeddings,
  norms, lm_head) -- and the LoRA parameters' fp32 master copy, fp32 gradient and the two AdamW moments
  (16 bytes per trainable parameter, divided by the world size: ZeRO-3, Rajbhandari et al. 2020, eq. 1).
  With ``offload`` these live in CPU memory instead.
* transient (the peak of one step): the gathered full unit being computed plus the prefetched next one,
  one dequantized linear weight (the frozen path dequantizes one matrix at a time, forward and backward),
  the activations autograd keeps (all of them, or only each layer's input with activation checkpointing,
  plus one layer's worth while that layer is recomputed), backward's temporaries, and the logits.

Units are the decoder layers, the embedding and the lm_head (each gathered only while it runs); the
root keeps the final norm. The activation coefficients list the tensors autograd saves in
``llama.model.DecoderLayer`` (see ``layer_activation_bytes``); ``tests/test_recipe_plan.py`` checks the
arithmetic by hand, the chapter checks the whole plan against measured peaks.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import llama

GiB = 1024 ** 3
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP
NF4_TABLE_BYTES = 16 * 4          # the 16-value NF4 code book (fp32), stored with each quantized weight
DQ_TABLE_BYTES = 256 * 4 + 4      # double quant: the 8-bit code book (fp32) and the absmax mean offset


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

    def __post_init__(self):
        for name in ("world_size", "gpu_bytes", "batch_size", "seq_len", "rank", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.target_modules) - set(ALL_LINEAR))
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {ALL_LINEAR}, got {unknown or '()'}")
        if self.compute_bytes not in (2, 4):
            raise ValueError(f"compute_bytes must be 2 (bf16) or 4 (fp32), got {self.compute_bytes}")


def quantized_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """(code bytes, absmax bytes) of one NF4 weight: two codes per byte; one absmax per block, fp32, or
    with double quantization 8 bits per block plus an fp32 scale per 256 blocks and the code tables."""
    blocks = math.ceil(numel / block_size)
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / 256) + DQ_TABLE_BYTES
    else:
        absmax = 4 * blocks
    return math.ceil(numel / 2), absmax + NF4_TABLE_BYTES


def lora_parameters(shape: llama.LlamaConfig, setup: Setup) -> int:
    """Trainable parameters: r * (in + out) per target linear (A is [r, in], B is [out, r]), plus the
    DoRA magnitude vector (out) when enabled, in every layer."""
    per_layer = sum(setup.rank * (i + o) + (o if setup.dora else 0)
                    for name, (o, i) in linear_shapes(shape).items() if name in setup.target_modules)
    return per_layer * shape.num_hidden_layers


def layer_activation_bytes(shape: llama.LlamaConfig, setup: Setup) -> int:
    """Bytes autograd keeps for one decoder layer's backward (no checkpointing), all tokens, not counting
    the layer's input (the "layer inputs" row).

    Per token, listed from ``llama.model.DecoderLayer`` with ``saved_tensors_hooks`` (c = compute bytes):
    the normalised input kept by q/k/v's LoRA, q and the rotated k and v repeated to every query head
    (scaled_dot_product_attention's inputs), the attention output kept by o_proj: 6 h values; gate,
    up, silu(gate) and silu(gate) * up kept by down_proj: 4 i; each LoRA's A output: r per target;
    RMSNorm's fp32 copies (the post-attention residual in fp32; both inputs upcast when c = 2);
    fp32 statistics (two rsqrt, one log-sum-exp per head). Plus the rotary cos/sin tables."""
    h, i, c = shape.hidden_size, shape.intermediate_size, setup.compute_bytes
    norms = 4 * h * (1 if c == 4 else 2)
    per_token = c * (6 * h + 4 * i) + c * setup.rank * len(setup.target_modules) + norms
    per_token += 4 * (2 + shape.num_attention_heads)
    head_dim = h // shape.num_attention_heads
    return setup.batch_size * setup.seq_len * per_token + 2 * setup.seq_len * head_dim * c


@dataclasses.dataclass
class Plan:
    """Rows of (name, bytes per rank, where, what) and the peak, per rank."""
    shape: llama.LlamaConfig
    setup: Setup
    rows: list[tuple[str, int, str, str]]

    def total(self, where: str) -> int:
        return sum(b for _, b, w, _ in self.rows if w == where)

    @property
    def peak_gpu_bytes(self) -> int:
        return self.total("device")

    @property
    def fits(self) -> bool:
        return self.peak_gpu_bytes <= self.setup.gpu_bytes

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
        lines.append(f"{'peak on the device':<34}{self.peak_gpu_bytes / 2**20:>10.1f}  = {self.peak_gpu_bytes / GiB:.2f} "
                     f"GiB of {s.gpu_bytes / GiB:.1f} GiB: {'fits' if self.fits else 'DOES NOT FIT'}")
        if self.total("cpu"):
            lines.append(f"{'held in CPU memory (offload)':<34}{self.total('cpu') / 2**20:>10.1f}  = "
                         f"{self.total('cpu') / GiB:.2f} GiB")
        return "\n".join(lines)


def gathered_bytes(embedding: int, layer: int, head: int, n_layers: int, prefetch: bool) -> int:
    """The most memory all-gathered at once. Units run in the order embedding, layers, lm_head; with
    prefetch the next one is gathered while the current one computes, so the peak is the largest sum of
    two neighbours. A tied lm_head shares the embedding, which then stays in the root, gathered."""
    if head == 0:
        return embedding + (2 if prefetch else 1) * layer
    sizes = [embedding, *[layer] * n_layers, head]
    return max(a + b for a, b in zip(sizes, sizes[1:])) if prefetch else max(sizes)


def plan(config, setup: Setup | None = None) -> Plan:
    """Per-rank memory of fine-tuning ``config`` (see ``llama_config``) under ``setup``."""
    shape = llama_config(config)
    setup = setup or Setup()
    w, c = setup.world_size, setup.compute_bytes
    h, v, n_layers = shape.hidden_size, shape.vocab_size, shape.num_hidden_layers
    linears = linear_shapes(shape)
    if setup.quantize:
        codes, absmax = map(sum, zip(*(quantized_bytes(o * i, setup.block_size, setup.double_quant)
                                       for o, i in linears.values())))
    else:
        codes, absmax = c * sum(o * i for o, i in linears.values()), 0
    norms = 2 * h * c
    lora_layer = lora_parameters(shape, setup) // n_layers
    embedding = v * h * c
    head = 0 if shape.tie_word_embeddings else embedding
    layer_unit = codes + absmax + norms + lora_layer * c   # one gathered decoder layer

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
        ("LoRA fp32 master + grad + AdamW", shard(16 * trainable), resident,
         f"{trainable / 1e6:.2f}M trainable params x 16 B / {w}"),
        ("gathered units (current + next)", gathered_bytes(embedding, layer_unit, head, n_layers, setup.prefetch),
         "device", "two neighbouring units all-gathered at once (prefetch)"),
        ("dequantized weight (working set)", c * max(o * i for o, i in linears.values()) if setup.quantize else 0,
         "device", "the largest linear, one at a time"),
    ]
    tokens = setup.batch_size * setup.seq_len
    rows.append(("activations: layer inputs", n_layers * tokens * h * c, "device", "each layer's input"))
    if setup.activation_checkpointing:
        rows.append(("activations: one layer recomputed", layer_activation_bytes(shape, setup), "device",
                     "the layer under backward"))
    else:
        rows.append(("activations: all layers", n_layers * layer_activation_bytes(shape, setup), "device",
                     "everything else autograd saves"))
    rows.append(("backward temporaries", tokens * c * (3 * h + 2 * shape.intermediate_size), "device",
                 "gradients flowing through one layer"))
    logits_bytes = tokens * v * (c + 12 if c == 2 else 12)
    rows.append(("logits + loss", logits_bytes, "device", "logits, fp32 log-softmax and its gradient"))
    return Plan(shape, setup, rows)


def main(argv=None) -> Plan:
    p = argparse.ArgumentParser(prog="python -m recipe.plan", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="llama-2-70b", help="preset name, config.json or checkpoint dir")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--gpu-gib", type=float, default=24.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--target-modules", default=",".join(ALL_LINEAR))
    p.add_argument("--dora", action="store_true")
    p.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--no-quant", dest="quantize", action="store_false")
    p.add_argument("--fp32", action="store_true", help="compute in fp32 (4 bytes) instead of bf16")
    a = p.parse_args(argv)
    setup = Setup(world_size=a.world_size, gpu_bytes=int(a.gpu_gib * GiB), batch_size=a.batch_size,
                  seq_len=a.seq_len, rank=a.rank, target_modules=tuple(a.target_modules.split(",")), dora=a.dora,
                  activation_checkpointing=a.activation_checkpointing, offload=a.offload, quantize=a.quantize,
                  compute_bytes=4 if a.fp32 else 2)
    result = plan(a.config, setup)
    print(result.table())
    return result


if __name__ == "__main__":
    main()
