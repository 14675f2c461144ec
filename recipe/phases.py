"""What is live on the device at each phase of a training step, beyond the persistent shards.

``recipe.plan`` adds the persistent bytes to the largest phase; ``recipe.measure`` checks each phase and
each component (``recipe.phase_memory`` files measured storages under the same names) on a real run.
"""
from __future__ import annotations

import math

import llama


def layer_activation_bytes(shape: llama.LlamaConfig, setup) -> int:
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


def phase_bytes(shape: llama.LlamaConfig, setup, order: list[int]) -> dict[str, dict[str, int]]:
    """What is live on the device, beyond the persistent shards, at the peak of each phase of a step
    (``order``: gathered bytes of the units in forward order: embedding, layers, lm_head if untied),
    as ``recipe.measure`` measures them.

    saved activations: without checkpointing, every layer's ``layer_activation_bytes`` plus, in fp32,
      each norm's input (kept by the norm's backward: the fp32 copy in bf16 runs is already counted);
      layer 0's input needs no gradient (the embedding is frozen), its place taken by the final norm's.
      With checkpointing: each layer's input (what the recompute starts from) and the final norm's.
    forward, at the loss: the saved activations, the logits (c bytes each), their fp32 shifted copy and
      the fp32 log-softmax cross-entropy saves (8 bytes per logit more); or, if larger, in the last
      layer: the saved activations, the layer and the prefetched lm_head gathered, and a dequantized
      weight, or with checkpointing the layer's own intermediates at the SwiGLU product (the normalised
      input h, SiLU(gate), up and their product: 3 i).
    backward (loss): log-softmax's output, the gradient arriving and the one leaving it (3 x 4 bytes
      per logit); or, in lm_head's backward, the logits' gradient with lm_head and the last layer
      gathered, whichever is larger.
    backward (layers): the largest of these moments. In the final norm's backward: every saved activation
      still alive, the last layer gathered (prefetched), the norm's five fp32 temporaries (x^2, the
      products and the quotient of its backward). In the last layer's backward (``layer_backward``), with
      the gathered layer and the unit before it (prefetched: the previous layer, or the embedding before
      layer 0) -- or, with checkpointing, the same at layer 0, where the prefetched unit is the embedding
      and only layer 0's input remains saved (measured larger at 7B width with 2 layers).
    optimizer: the fp32 LoRA gradients (AdamW updates tensor by tensor in place).
    On the CPU every phase also holds nf4's dequantization workspace (``cpu_workspace_bytes``)."""
    from .plan import linear_shapes, lora_parameters  # plan.py imports this module

    h, v, c = shape.hidden_size, shape.vocab_size, setup.compute_bytes
    tokens, n_layers = setup.batch_size * setup.seq_len, shape.num_hidden_layers
    fp32_norm_input = tokens * h * 4
    if setup.activation_checkpointing:
        saved = n_layers * tokens * h * c + fp32_norm_input
    else:
        saved = n_layers * (layer_activation_bytes(shape, setup) + (fp32_norm_input if c == 4 else 0))
    largest = max(o * i for o, i in linear_shapes(shape).values())
    dequantized = dense_weight_bytes(largest, setup) + dequantize_scratch_bytes(largest, setup)
    in_backward = layer_backward(shape, setup, saved, largest)
    logits, embedding, layer, head = tokens * v, order[0], order[1], (0 if shape.tie_word_embeddings else order[-1])
    root = 0 if head else embedding  # a tied embedding stays gathered in the root all step
    before_last = (layer if n_layers > 1 else embedding - root) if setup.prefetch else 0
    lm_head_backward = c * logits + tokens * h * c + head + layer
    at_loss = {"activations": saved, "logits + loss": logits * (c + 8), "gathered units": root}
    if setup.activation_checkpointing:  # at the SwiGLU product
        in_last_layer = {"activations": saved + tokens * c * (h + 3 * shape.intermediate_size)}
    else:  # dequantizing a weight: the other intermediates are saved anyway
        in_last_layer = {"activations": saved, "dequantized weight": dequantized}
    in_last_layer["gathered units"] = root + layer + (head or layer)
    first_layer = {**in_backward, "gathered units": root + layer + embedding - root,
                   "activations": tokens * h * c}  # recompute of layer 0, the embedding prefetched
    if not setup.activation_checkpointing or not setup.prefetch or n_layers == 1:
        first_layer = {}
    phases = {
        "forward": max(at_loss, in_last_layer, key=lambda parts: sum(parts.values())),
        "backward (loss)": {"activations": saved, "logits + loss": max(12 * logits, lm_head_backward),
                            "gathered units": root},
        "backward (layers)": max({**in_backward, "gathered units": root + layer + before_last}, first_layer,
                                 {"activations": saved, "backward": 5 * fp32_norm_input, "gathered units": root + layer},
                                 key=lambda parts: sum(parts.values())),
        "optimizer": {"backward": 0 if setup.offload else math.ceil(4 * lora_parameters(shape, setup) / setup.world_size)},
    }
    workspace = cpu_workspace_bytes(largest, setup)
    for parts in phases.values() if workspace else ():
        parts["dequantized weight"] = parts.get("dequantized weight", 0) + workspace
    return phases


def layer_backward(shape: llama.LlamaConfig, setup, saved: int, largest: int) -> dict[str, int]:
    """The largest moment of the last decoder layer's backward, beside the gathered units: the saved
    activations (``saved``) less what is already consumed (the final norm's fp32 input; without
    checkpointing also down_proj's input), the gradients flowing, and at most one dequantized weight
    (``largest`` values).

    Without checkpointing, in its MLP backward: after down_proj's input gradient is split
    (``backward_temporary_bytes``; the up_proj weight dequantized for its matmul), or while down_proj's
    weight is dequantized (the gradient arriving and one i-sized gradient); with checkpointing, at the
    end of the recompute: the recomputed layer's activations (``layer_activation_bytes``), the gradient
    arriving at its output and a dequantized weight. Either way, with LoRA on down_proj, when its frozen
    and LoRA paths' input gradients are summed: h + 3 i of gradients (down_proj's input consumed)."""
    h, i, c = shape.hidden_size, shape.intermediate_size, setup.compute_bytes
    tokens = setup.batch_size * setup.seq_len
    activations = saved - tokens * h * 4
    weight = dense_weight_bytes(largest, setup)  # alive through the matmul (a GPU's fresh weight)
    dequantized = weight + dequantize_scratch_bytes(largest, setup)
    if setup.activation_checkpointing:
        recomputed, kept = {"recompute": layer_activation_bytes(shape, setup)}, activations
        moments = [{"backward": tokens * h * c, "dequantized weight": dequantized}]
    else:
        recomputed, kept = {}, activations - tokens * i * c
        moments = [{"backward": backward_temporary_bytes(shape, setup), "dequantized weight": weight},
                   {"backward": tokens * c * (h + i), "dequantized weight": dequantized}]
    moments = [{"activations": kept, **recomputed, **m} for m in moments]
    if "down_proj" in setup.target_modules:
        consumed = {"recompute": recomputed["recompute"] - tokens * i * c} if recomputed else {}
        moments.append({"activations": kept, **recomputed, **consumed, "dequantized weight": 0,
                        "backward": tokens * c * (h + 3 * i)})
    return max(moments, key=lambda parts: sum(parts.values()))


def backward_temporary_bytes(shape: llama.LlamaConfig, setup) -> int:
    """Gradients alive at once at the peak of a decoder layer's backward (measured in the MLP): the
    gradient arriving at the layer's output (h), and the two down_proj's input gradient is split into,
    w.r.t. SiLU(gate) and up (2 i)."""
    h, i = shape.hidden_size, shape.intermediate_size
    return setup.batch_size * setup.seq_len * setup.compute_bytes * (h + 2 * i)


CPU_CHUNK_VALUES = 1 << 20  # nf4.fast_path.chunk_values on the CPU


def cpu_workspace_bytes(largest: int, setup) -> int:
    """On the CPU, ``nf4.Linear4bit`` writes every dense weight into one reused workspace per thread and
    dtype, grown to the largest linear (``largest`` values) at the first forward -- the held-out
    evaluation before training, or the first step -- and kept: live in every phase. One thread runs the
    forwards (and the CPU backward), so one workspace. On a GPU there is none."""
    return setup.compute_bytes * largest if setup.quantize and setup.device == "cpu" else 0


def dense_weight_bytes(numel: int, setup) -> int:
    """The dense weight one dequantization allocates: on a GPU a fresh tensor in the compute dtype, freed
    after its matmul; on the CPU none (it goes into ``cpu_workspace_bytes``)."""
    return setup.compute_bytes * numel if setup.quantize and setup.device == "cuda" else 0


def dequantize_scratch_bytes(numel: int, setup) -> int:
    """Temporaries while one weight of ``numel`` values is dequantized. A GPU's Triton kernel needs none.
    On the CPU (``nf4.fast_path``): the fp32 block absmax (4 bytes per 64 values) and, per chunk of at
    most 2^20 values, an int64 byte index and int64 level pairs (8 bytes per value). With several torch
    threads each worker thread has its own 32768-value chunk instead (256 KiB each), which
    ``recipe.phase_memory`` cannot see (a dispatch mode sees only its own thread)."""
    if not setup.quantize or setup.device != "cpu":
        return 0
    return 4 * math.ceil(numel / 64) + 8 * min(numel, CPU_CHUNK_VALUES)
