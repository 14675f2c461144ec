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
      layer: the saved activations, the layer and the prefetched lm_head gathered, a dequantized weight.
    backward (loss): log-softmax's output, the gradient arriving and the one leaving it (3 x 4 bytes
      per logit); or, in lm_head's backward, the logits' gradient with lm_head and the last layer
      gathered, whichever is larger.
    backward (layers): the larger of two moments. In the final norm's backward: every saved activation
      still alive, the last layer gathered (prefetched), the norm's five fp32 temporaries (x^2, the
      products and the quotient of its backward). In the last layer's: the gathered layer and the unit before it (prefetched: the
      previous layer, or the embedding before layer 0) and one dequantized weight, plus, without
      checkpointing, in its MLP backward: the saved activations less the two already consumed (the
      final norm's fp32 input, down_proj's input) and the gradients flowing
      (``backward_temporary_bytes``), or, if larger, while a weight is dequantized (its CPU
      workspace live, one i-sized gradient fewer); with checkpointing, at the end of its recompute: the other
      layers' inputs, the recomputed layer's activations and the gradient arriving at its output --
      or the same at layer 0, where the prefetched unit is the embedding and only layer 0's input
      remains saved (measured larger at 7B width with 2 layers).
    optimizer: the fp32 LoRA gradients (AdamW updates tensor by tensor in place)."""
    from .plan import linear_shapes, lora_parameters  # plan.py imports this module

    h, v, c = shape.hidden_size, shape.vocab_size, setup.compute_bytes
    tokens, n_layers = setup.batch_size * setup.seq_len, shape.num_hidden_layers
    fp32_norm_input = tokens * h * 4
    if setup.activation_checkpointing:
        saved, recompute = n_layers * tokens * h * c + fp32_norm_input, layer_activation_bytes(shape, setup)
    else:
        saved, recompute = n_layers * (layer_activation_bytes(shape, setup) + (fp32_norm_input if c == 4 else 0)), 0
    dequantized = dequantize_bytes(max(o * i for o, i in linear_shapes(shape).values()), setup)
    weight_only = dequantized - dequantize_bytes(0, setup)  # the workspace freed once dequantized
    consumed = fp32_norm_input + tokens * shape.intermediate_size * c
    if setup.activation_checkpointing:  # at the end of the last layer's recompute
        in_backward = {"activations": saved - fp32_norm_input, "recompute": recompute + tokens * h * c, "backward": 0}
    else:  # in its MLP backward: once down_proj's input gradient is split, or while a weight is dequantized
        split = {"activations": saved - consumed, "backward": backward_temporary_bytes(shape, setup),
                 "dequantized weight": weight_only}
        dequantizing = {"activations": saved - consumed, "dequantized weight": dequantized,
                        "backward": tokens * c * (h + shape.intermediate_size)}
        in_backward = max(split, dequantizing, key=lambda parts: sum(parts.values()))
    logits, embedding, layer, head = tokens * v, order[0], order[1], (0 if shape.tie_word_embeddings else order[-1])
    root = 0 if head else embedding  # a tied embedding stays gathered in the root all step
    before_last = (layer if n_layers > 1 else embedding - root) if setup.prefetch else 0
    lm_head_backward = c * logits + tokens * h * c + head + layer
    at_loss = {"activations": saved, "logits + loss": logits * (c + 8), "gathered units": root}
    if setup.activation_checkpointing:  # at the SwiGLU product: the layer's own intermediates, h + 4 i
        in_last_layer = {"activations": saved + tokens * c * (h + 4 * shape.intermediate_size)}
    else:  # dequantizing a weight: the other intermediates are saved anyway
        in_last_layer = {"activations": saved, "dequantized weight": dequantized}
    in_last_layer["gathered units"] = root + layer + (head or layer)
    first_layer = {**in_backward, "dequantized weight": dequantized, "gathered units": root + layer + embedding - root,
                   "activations": tokens * h * c}  # recompute of layer 0, the embedding prefetched
    if not setup.activation_checkpointing or not setup.prefetch or n_layers == 1:
        first_layer = {}
    return {
        "forward": max(at_loss, in_last_layer, key=lambda parts: sum(parts.values())),
        "backward (loss)": {"activations": saved, "logits + loss": max(12 * logits, lm_head_backward),
                            "gathered units": root},
        "backward (layers)": max({"dequantized weight": dequantized, **in_backward, "gathered units": root + layer + before_last},
                                 first_layer,
                                 {"activations": saved, "backward": 5 * fp32_norm_input, "gathered units": root + layer},
                                 key=lambda parts: sum(parts.values())),
        "optimizer": {"backward": 0 if setup.offload else math.ceil(4 * lora_parameters(shape, setup) / setup.world_size)},
    }


def backward_temporary_bytes(shape: llama.LlamaConfig, setup) -> int:
    """Gradients alive at once at the peak of a decoder layer's backward (measured in the MLP): the
    gradient arriving at the layer's output (h), and the two down_proj's input gradient is split into,
    w.r.t. SiLU(gate) and up (2 i)."""
    h, i = shape.hidden_size, shape.intermediate_size
    return setup.batch_size * setup.seq_len * setup.compute_bytes * (h + 2 * i)




def dequantize_bytes(numel: int, setup) -> int:
    """Memory of dequantizing one NF4 weight of ``numel`` values: the weight in the compute dtype;
    on the CPU, also the PyTorch path's index workspace (int32 byte index + int64 value pairs for a
    chunk of 2^20 values, ``nf4.dequantize``: 6 MiB)."""
    if not setup.quantize:
        return 0
    workspace = 12 * (1 << 19) if setup.device == "cpu" else 0  # sized for a chunk, whatever the weight
    return setup.compute_bytes * numel + workspace
