"""A preallocated key/value cache: what makes decoding one token cheap.

Causal attention at position t needs the keys and values of positions 0..t. They never change once
computed, so generation keeps them: the prompt runs once (prefill, filling the cache), then each new
token runs the layers on that one token (decode), appending its key and value and attending over the
cache. Without a cache every step would rerun the whole sequence.

The cache stores the key/value heads only (grouped-query attention shares each among
n_heads / n_kv_heads query heads), per layer a (batch, n_kv_heads, max_length, head_dim) tensor for
keys and one for values, allocated once up front, so decoding never reallocates or copies the past.

    cache = KVCache(config, batch_size=2, max_length=512)
    logits = model(prompt_ids, kv_cache=cache)      # prefill: cache.length == prompt length
    logits = model(next_ids, kv_cache=cache)        # decode: one token per sequence
"""
from __future__ import annotations

import torch

from .config import LlamaConfig


class KVCache:
    """Per-layer keys and values of the first ``length`` positions of ``batch_size`` sequences."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_length: int, *, device=None,
                 dtype: torch.dtype = torch.float32):
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name} must be a positive int, got {value!r}")
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.batch_size, self.max_length, self.length = batch_size, max_length, 0

    @staticmethod
    def bytes_needed(config: LlamaConfig, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        """2 (keys, values) x layers x batch x kv heads x positions x head_dim x bytes per element."""
        per_element = torch.empty((), dtype=dtype).element_size()
        return (2 * config.num_hidden_layers * batch_size * config.num_key_value_heads * max_length
                * config.head_dim * per_element)

    def update(self, layer_index: int, keys: torch.Tensor, values: torch.Tensor):
        """Write the new tokens' (batch, n_kv_heads, new, head_dim) keys and values after the cached
        ones; return views of all of them, (batch, n_kv_heads, length + new, head_dim)."""
        end = self.length + keys.shape[2]
        if keys.shape[0] != self.batch_size:
            raise ValueError(f"the KV cache holds {self.batch_size} sequences, got a batch of {keys.shape[0]}")
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {self.length} cached + "
                             f"{keys.shape[2]} new = {end} do not fit")
        self.keys[layer_index][:, :, self.length:end] = keys
        self.values[layer_index][:, :, self.length:end] = values
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Count ``new_tokens`` positions as cached (the model calls this after its last layer)."""
        self.length += new_tokens
