"""Rows of examples to batches: packed into ``seq_len`` rows with document boundaries, or padded.

Packing puts several examples in one row; ``llama.masks`` then keeps them apart: the attention mask
is block-diagonal causal (a token sees only earlier tokens of its own example), the rotary positions
restart at 0 at every example, and the first token of each example is not scored (the previous
example's last token must not learn to predict it). So a packed row gives every example exactly the
loss it gets alone, with no padding wasted. Without packing each row holds one example and the batch
is padded to its longest row; the padding (segment id -1) is masked out of attention and loss alike.

Labels are the token ids where the target mask is set and -100 elsewhere (ignored by the loss).
A batch is ``recipe.data.Batch``, the one the training loop consumes; `ExampleRows` is what its
sampler draws rows from.
"""
from __future__ import annotations

import torch

from llama.masks import document_mask, document_positions, is_segment_start

from ..data import Batch
from .encode import Encoded


def fit_length(examples: list[Encoded], seq_len: int, drop_long: bool = False) -> tuple[list[Encoded], dict]:
    """Examples longer than ``seq_len`` cut to their first ``seq_len`` tokens (or dropped with
    ``drop_long``); an example left with nothing to learn (no target after its first token) is dropped.
    Returns the examples kept and the counts ``{"truncated": n, "dropped": m}`` to report."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    kept, counts = [], {"truncated": 0, "dropped": 0}
    for example in examples:
        if len(example) > seq_len:
            if drop_long:
                counts["dropped"] += 1
                continue
            example = Encoded(example.ids[:seq_len], example.targets[:seq_len])
            counts["truncated"] += 1
        if not any(example.targets[1:]):
            counts["dropped"] += 1
            continue
        kept.append(example)
    return kept, counts


def pack(examples: list[Encoded], seq_len: int) -> list[list[Encoded]]:
    """First-fit packing, in the given order: each example goes into the first row with room for it."""
    rows, free = [], []
    for example in examples:
        if len(example) > seq_len:
            raise ValueError(f"an example of {len(example)} tokens does not fit seq_len={seq_len}; fit_length first")
        row = next((r for r, room in enumerate(free) if room >= len(example)), None)
        if row is None:
            rows.append([])
            free.append(seq_len)
            row = len(rows) - 1
        rows[row].append(example)
        free[row] -= len(example)
    return rows


def collate(rows: list[list[Encoded]], length: int | None = None, pad_id: int = 0) -> Batch:
    """A ``Batch`` of ``rows`` (each a list of examples) padded to ``length`` (default: the longest row)."""
    sizes = [sum(len(example) for example in row) for row in rows]
    length = max(sizes) if length is None else length
    if not rows or max(sizes) > length:
        raise ValueError(f"rows of {sizes} tokens do not fit length={length}")
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    segments = torch.full_like(ids, -1)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            end = start + len(example)
            ids[r, start:end] = torch.tensor(example.ids)
            labels[r, start:end] = torch.where(torch.tensor(example.targets), ids[r, start:end], -100)
            segments[r, start:end] = s
            start = end
    labels[is_segment_start(segments)] = -100
    return Batch(ids, labels, document_positions(segments), document_mask(segments))


def batches(examples: list[Encoded], batch_size: int, seq_len: int, packing: bool, pad_id: int = 0) -> list[Batch]:
    """Batches of ``batch_size`` rows: packed ``seq_len`` rows, or one example a row padded per batch."""
    rows = ExampleRows(examples, seq_len, packing, pad_id)
    return [rows.batch(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]


class ExampleRows:
    """The rows a sampler draws from: examples packed into ``seq_len`` rows (fixed once, first-fit in
    the given order), or one example a row; ``batch(indices)`` collates the chosen rows (packed rows
    filled to ``seq_len``, padded rows to the longest of the batch)."""

    def __init__(self, examples: list[Encoded], seq_len: int, packing: bool, pad_id: int = 0):
        self.rows = pack(examples, seq_len) if packing else [[example] for example in examples]
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> Batch:
        return collate([self.rows[int(i)] for i in indices], self.seq_len if self.packing else None, self.pad_id)
