"""What every training loop over the Llama shares: the learning-rate schedule and the held-out loss.

Used by the pretraining script (``llama/pretrain.py``), the fine-tuning loop (``recipe/loop.py``) and
the library side of the end-to-end benchmark, so all three schedule and evaluate the same way.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def warmup_cosine(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """The learning rate of ``step`` (0-based): linear warmup to ``peak`` over ``warmup`` steps, then cosine
    decay to ``floor * peak`` at ``steps`` (the schedule of the Llama and QLoRA papers; a function of the
    step alone, so a resumed run needs no schedule state)."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup and steps must be >= 1, got warmup={warmup}, steps={steps}")
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's mean next-token cross-entropy on a batch of token ids (``labels = ids``)."""
    return model(ids, labels=ids)[1]


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable, loss_of: Callable | None = None) -> float:
    """Mean held-out loss over ``batches``, each weighted by its number of rows, in eval mode (no dropout,
    so no random numbers are drawn: evaluating does not change a training run). ``loss_of(batch)`` gives
    one batch's mean loss (default: `next_token_loss` of ``model`` on a tensor of ids)."""
    loss_of = loss_of or (lambda ids: next_token_loss(model, ids))
    was_training = model.training
    model.eval()
    total, rows = 0.0, 0
    for batch in batches:
        total, rows = total + loss_of(batch).item() * len(batch), rows + len(batch)
    model.train(was_training)
    if rows == 0:
        raise ValueError("mean_loss: no batches to evaluate")
    return total / rows
