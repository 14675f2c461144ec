"""The learning-rate schedule every training loop over the Llama uses, and pretraining's held-out loss.

``warmup_cosine`` is the schedule of the pretraining script (``llama/pretrain.py``) and of the
fine-tuning loop (``recipe/loop.py``, which the end-to-end benchmark's library stack trains through
too), so both schedule the same way. ``mean_loss`` is the pretraining script's held-out loss; the
fine-tuning loop weighs its held-out loss by target token instead (``recipe.loop.evaluate``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

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


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (``labels = ids``) over ``batches`` of token ids, each batch weighted by
    its number of rows, in eval mode (no dropout, so no random numbers are drawn: evaluating does not
    change a training run)."""
    was_training = model.training
    model.eval()
    total, rows = 0.0, 0
    for ids in batches:
        total, rows = total + model(ids, labels=ids)[1].item() * len(ids), rows + len(ids)
    model.train(was_training)
    if rows == 0:
        raise ValueError("mean_loss: no batches to evaluate")
    return total / rows
