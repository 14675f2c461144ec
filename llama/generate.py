"""Generate text with a KV cache: the prompts run once (prefill), then one new token per step (decode).

    out = llama.generate(model, [tok.encode("def add(a, b):")], max_new_tokens=40,
                         sampling=Sampling(temperature=0.8, top_p=0.95), stop_ids=[tok.eos_token_id])

Prompts of different lengths form one batch by left padding: every prompt ends in the same column, so
each step appends one column. ``llama.masks.padded_mask`` keeps every query off the padding and
``padded_positions`` starts each prompt's rotary positions at 0, so a padded prompt computes what it
computes alone. A sequence that produced a stop id is finished: it keeps riding along in the batch (its
outputs ignored) until every sequence has finished or ``max_new_tokens`` is reached.

Choosing the next token (``Sampling``): temperature 0 is greedy (argmax, what transformers'
``generate(do_sample=False)`` does); otherwise the logits are divided by the temperature, cut to the
``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p`` (nucleus
sampling, Holtzman et al. 2020), and a token is drawn from the softmax of what remains.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from .kv_cache import KVCache
from .masks import padded_mask, padded_positions


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) token ids, greedy or sampled as ``sampling`` says."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= sampling.top_p, float("-inf"))  # the first always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token id lists, got {type(prompts).__name__}")
    checked = []
    for i, prompt in enumerate(prompts):
        prompt = list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompt or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids in 0..{vocab_size - 1}")
        checked.append(prompt)
    return checked


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = (), generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens; return the new
    tokens per prompt, ending with the stop id if one was produced. ``on_token(i, token)`` is called
    as each token of prompt i is produced (streaming). ``model`` is a ``llama.Llama`` (any wrapping of
    its linears, quantized or LoRA, is fine)."""
    config = model.config
    prompts = _check_prompts(prompts, config.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    embedding = model.model.embed_tokens.weight
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(batch, width, dtype=torch.long)
    valid = torch.ones(batch, width + max_new_tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, :width - len(prompt)] = False
    ids, valid = ids.to(embedding.device), valid.to(embedding.device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=embedding.device)
    cache = KVCache(config, batch, width + max_new_tokens, device=embedding.device, dtype=embedding.dtype)
    positions = padded_positions(valid[:, :width])
    logits = model(ids, position_ids=positions, attention_mask=padded_mask(valid[:, :width]), kv_cache=cache)
    positions, out = positions[:, -1:], [[] for _ in prompts]
    done = torch.zeros(batch, dtype=torch.bool, device=embedding.device)
    for step in range(max_new_tokens):
        token = next_token(logits[:, -1], sampling, generator)
        for row, value in enumerate(token.tolist()):
            if not done[row]:
                out[row].append(value)
                if on_token is not None:
                    on_token(row, value)
        done |= torch.isin(token, stops)
        if done.all() or step == max_new_tokens - 1:
            break
        positions = positions + 1
        kv_len = width + step + 1
        logits = model(token[:, None], position_ids=positions, kv_cache=cache,
                       attention_mask=padded_mask(valid[:, :kv_len], q_len=1))
    return out
