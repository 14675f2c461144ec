"""Attention masks and position ids for packing and batched generation.

The model's interface::

    logits = model(input_ids)                                  # causal, positions 0..seq-1 (SDPA is_causal)
    logits, loss = model(input_ids, labels, position_ids=pos, attention_mask=mask)
    logits = model(input_ids, kv_cache=cache)                  # generation: llama.generate

- ``position_ids``: int tensor (batch, seq), the rotary position of each token; for packed rows it
  restarts at 0 at every example (``document_positions``).
- ``attention_mask``: bool tensor (batch, q_len, kv_len), True = query may attend to key. It is used
  as given: the caller includes causality (every builder here does). With a KV cache, kv_len counts
  the cached tokens plus the new ones.
- Neither given: plain causal attention, positions 0..seq-1 (after the cache's tokens, if a cache).

Packing several examples into one row (``segment_ids`` numbers the examples of a row, one id per
token, e.g. ``[0, 0, 0, 1, 1, 2, 2, 2]``)::

    mask, pos = document_mask(segment_ids), document_positions(segment_ids)
    labels[is_segment_start(segment_ids)] = -100   # do not score the previous example predicting this one

Each example then sees exactly what it would see alone: attention never crosses an example boundary,
and its rotary positions restart at 0. A negative segment id marks padding: such a token attends only
to itself, so its output is finite and nothing else sees it.

Batched generation pads prompts on the left (``valid`` is True on real tokens); ``padded_mask`` and
``padded_positions`` give each prompt the mask and positions it would have alone. A padding query
attends only to itself (a row with no allowed key would make SDPA return NaN, which the next layer's
keys and values would carry into every sequence, since a masked weight of 0 times NaN is NaN).
"""
from __future__ import annotations

import torch


def _check_2d(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a (batch, seq) tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a (batch, seq) tensor, got shape {tuple(tensor.shape)}")


def causal_mask(q_len: int, kv_len: int | None = None, device=None) -> torch.Tensor:
    """(1, q_len, kv_len) bool: the queries are the last ``q_len`` of ``kv_len`` positions (a KV cache
    holds the first kv_len - q_len), and query i may attend to keys 0 .. kv_len - q_len + i."""
    kv_len = q_len if kv_len is None else kv_len
    if q_len < 1 or kv_len < q_len:
        raise ValueError(f"causal_mask needs 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return (torch.arange(kv_len, device=device)[None, :] <= query_pos[:, None])[None]


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq, seq) bool: causal and within one example (block-diagonal causal); a token with a
    negative segment id (padding) attends only to itself."""
    _check_2d("segment_ids", segment_ids)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    same &= (segment_ids >= 0)[:, None, :]
    seq = segment_ids.shape[1]
    self_only = torch.eye(seq, dtype=torch.bool, device=segment_ids.device)[None]
    return (same & causal_mask(seq, device=segment_ids.device)) | self_only


def is_segment_start(segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: True where a token begins a new example (the first token of each row too)."""
    _check_2d("segment_ids", segment_ids)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return start


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) long: each token's index within its example (restarting at 0 at each start)."""
    start = is_segment_start(segment_ids)
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    last_start = torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def padded_positions(valid: torch.Tensor) -> torch.Tensor:
    """(batch, seq) long positions for left-padded rows: 0, 1, ... from each row's first real token;
    padding gets 0."""
    _check_2d("valid", valid)
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def padded_mask(valid: torch.Tensor, q_len: int | None = None) -> torch.Tensor:
    """(batch, q_len, kv_len) bool for left-padded rows: causal, never attending to a padding key.

    ``valid`` (batch, kv_len) is True on real tokens, covering the cached tokens and the new ones;
    the queries are the last ``q_len`` (default: all) positions. A padding query attends to itself."""
    _check_2d("valid", valid)
    valid = valid.bool()
    kv_len = valid.shape[1]
    q_len = kv_len if q_len is None else q_len
    mask = causal_mask(q_len, kv_len, device=valid.device) & valid[:, None, :]
    query_pos = torch.arange(kv_len - q_len, kv_len, device=valid.device)
    is_self = torch.arange(kv_len, device=valid.device)[None, :] == query_pos[:, None]
    return mask | (is_self[None] & ~valid[:, kv_len - q_len:, None])
