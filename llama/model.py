"""A Llama in plain PyTorch whose module names and state-dict keys are exactly Hugging Face's.

    Llama
    ├── model                       (LlamaModel)
    │   ├── embed_tokens            Embedding(vocab, hidden)
    │   ├── layers[i]               (DecoderLayer) x num_hidden_layers  <- one sharding unit each
    │   │   ├── input_layernorm     RMSNorm
    │   │   ├── self_attn           q_proj, k_proj, v_proj, o_proj  (grouped-query, rotary)
    │   │   ├── post_attention_layernorm
    │   │   └── mlp                 gate_proj, up_proj, down_proj   (SwiGLU)
    │   └── norm                    RMSNorm
    └── lm_head                     Linear(hidden, vocab)  (or tied to embed_tokens)

Every projection is a bias-free ``nn.Linear`` reached by its Hugging Face name
(``model.layers.3.mlp.down_proj``), so a quantized or LoRA layer can replace it by name. Build it on
the meta device (``with torch.device("meta"): Llama(cfg)``) and a 70B shape costs no memory.
Rotary tables are computed in ``forward`` from the config (no buffers), so nothing needs
materialising besides the parameters. ``forward`` optionally takes position ids, a boolean attention
mask (see ``llama.masks``) and a KV cache (``llama.kv_cache``, used by ``llama.generate``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig
from .kv_cache import KVCache
from .masks import causal_mask


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019); computed in fp32 like HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(config: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) (RoFormer, Su et al. 2021, eq. 15), with Llama 3.1's rescaling:
    wavelengths longer than original_context/low_freq_factor are slowed by ``factor``, those shorter
    than original_context/high_freq_factor are kept, and the band between is interpolated smoothly."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's convention: pair dimension i with i + d/2 (not interleaved pairs as in the RoFormer paper)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(config: LlamaConfig, positions: int | torch.Tensor, device, dtype):
    """cos and sin of position x frequency: (seq, head_dim) for positions 0..seq-1 (an int) or a (seq,)
    tensor, (batch, 1, seq, head_dim) for (batch, seq) positions: broadcast over the heads."""
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    angles = positions.float()[..., None] * rope_frequencies(config, device)
    angles = torch.cat((angles, angles), dim=-1)
    if angles.dim() == 3:
        angles = angles[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _sdpa_has_enable_gqa() -> bool:
    """Whether the installed torch's SDPA takes ``enable_gqa`` (torch >= 2.5): K/V heads shared by
    query heads without materialising the copies."""
    try:
        F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                                       enable_gqa=True)
        return True
    except TypeError:
        return False


SDPA_ENABLE_GQA = _sdpa_has_enable_gqa()


class Attention(nn.Module):
    """Causal grouped-query attention (Ainslie et al. 2023): n_kv_heads key/value heads, each shared by
    n_heads / n_kv_heads query heads."""

    def __init__(self, config: LlamaConfig, layer_index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.layer_index = layer_index  # which of a KV cache's layers is this one's
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """``mask``: (batch, q_len, kv_len) bool or None (causal when there is no cache; with a cache,
        None means every cached key is visible, as for one decoded token)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)
        groups, gqa = self.n_heads // self.n_kv_heads, {}
        # enable_gqa shares K/V heads without copying them. Its CPU backward sums a group's gradient
        # in another order than the copy's (a 1e-9 difference), so CPU training keeps the copy and
        # its results stay bit-for-bit what they were; inference and GPUs share.
        if groups > 1 and SDPA_ENABLE_GQA and (x.device.type != "cpu" or not torch.is_grad_enabled()):
            gqa = {"enable_gqa": True}
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        is_causal = mask is None and kv_cache is None
        attn_mask = None if mask is None else mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=False)
        self.up_proj = nn.Linear(h, m, bias=False)
        self.down_proj = nn.Linear(m, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: LlamaConfig, layer_index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        past, new = (kv_cache.length if kv_cache is not None else 0), input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + new, device=x.device)
        if attention_mask is None and kv_cache is not None and new > 1:
            attention_mask = causal_mask(new, past + new, device=x.device)
        cos, sin = rotary_cos_sin(self.config, position_ids, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(new)
        return self.norm(x)


class Llama(nn.Module):
    """Hugging Face's ``LlamaForCausalLM``, same parameter names: ``model.*`` and ``lm_head``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None):
        """Return ``logits`` (batch, seq, vocab), or ``(logits, loss)`` when ``labels`` is given.

        The loss is HF's causal-LM loss: position t predicts token t+1, so ``labels`` has the shape
        of ``input_ids`` (usually ``labels = input_ids``) and is shifted here; label -100 is ignored;
        the loss is the mean cross-entropy (in fp32) over the remaining tokens.

        ``position_ids`` (batch, seq) and ``attention_mask`` (batch, seq, kv_len) bool, True = may
        attend, used as given: see ``llama.masks``. Without them: causal, positions 0..seq-1 (after
        the cached ones when ``kv_cache`` is given; the cache then grows by seq)."""
        self._check_inputs(input_ids, position_ids, attention_mask, kv_cache)
        logits = self.lm_head(self.model(input_ids, position_ids, attention_mask, kv_cache))
        if labels is None:
            return logits
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return logits, causal_lm_loss(logits, labels)

    def _check_inputs(self, input_ids, position_ids, attention_mask, kv_cache) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dim() != 2:
            got = (f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer (batch, seq) tensor, got {got}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): nothing to run")
        if input_ids.device.type == "cpu":  # elsewhere this would cost a host sync every step
            low, high = (value.item() for value in torch.aminmax(input_ids))
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary 0..{self.config.vocab_size - 1}")
        if position_ids is not None and (position_ids.shape != input_ids.shape or position_ids.dtype.is_floating_point):
            raise ValueError(f"position_ids must be an integer tensor shaped like input_ids {tuple(input_ids.shape)}, "
                             f"got {position_ids.dtype} {tuple(position_ids.shape)}")
        if attention_mask is not None:
            kv_len = input_ids.shape[1] + (kv_cache.length if kv_cache is not None else 0)
            expected = (input_ids.shape[0], input_ids.shape[1], kv_len)
            if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != expected:
                raise ValueError(f"attention_mask must be a bool tensor of shape (batch, q_len, kv_len) = {expected}, "
                                 f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits[:, t] scored against labels[:, t + 1], -100 ignored."""
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
