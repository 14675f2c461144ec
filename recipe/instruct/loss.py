"""Token-weighted loss: every target token of a global batch weighs the same, wherever it sits.

A plain mean per micro-batch weighs a micro-batch of 3 target tokens as much as one of 300; once
prompts are masked out, micro-batches (and ranks) hold very different numbers of targets. The loss of
an optimizer step is instead

    L = (sum over ranks r, micro-batches m, target tokens t of  loss_rmt) / N,

N the number of target tokens in the whole global batch. N is known before the first micro-batch
(``global_target_count``: count this rank's targets, all-reduce the sum), so each micro-batch can
backward its share at once: ``scaled_loss = s_rm * W / N`` where s_rm is its sum of token losses and
W the world size. The factor W is there because the gradient reduction (FSDP's reduce-scatter here,
DDP's all-reduce) *averages* over ranks: (1/W) * sum_r grad(W * s_r / N) = grad(sum_r s_r / N) = grad L.
So ``--grad-accum 4 --batch-size 1`` takes the same step as ``--batch-size 4``, and 2 ranks take the
same step as 1 rank with both ranks' rows, whatever their target counts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..device import collective_device


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq - 1) fp32 next-token cross-entropy: logits[:, t] against labels[:, t + 1]; 0 where -100."""
    flat = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="none")
    return flat.view(labels.shape[0], -1)


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens of a batch, as a 0-d tensor on the labels' device (no host sync): labels other than
    -100, the first position excluded (never predicted)."""
    return (labels[:, 1:] != -100).sum()


def count_targets(labels: torch.Tensor) -> int:
    """`target_tokens` as a Python number."""
    return int(target_tokens(labels))


def global_targets(labels_per_micro_batch: list[torch.Tensor], group=None) -> torch.Tensor:
    """N as a float64 0-d tensor, without a host sync: this rank's target tokens over its micro-batches of
    the step, summed over all ranks (on the collective device when a process group is up)."""
    count = sum(target_tokens(labels) for labels in labels_per_micro_batch).to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        count = count.to(collective_device())  # NCCL reduces only GPU tensors
        dist.all_reduce(count, group=group)
    return count


def global_target_count(labels_per_micro_batch: list[torch.Tensor], group=None) -> int:
    """`global_targets` as a Python number (one host sync); ValueError when it is 0."""
    count = global_targets(labels_per_micro_batch, group)
    if count == 0:
        raise ValueError("the global batch has no target tokens: every example was prompt only or truncated away")
    return int(count)


def scaled_loss(logits: torch.Tensor, labels: torch.Tensor, global_targets: int, world_size: int = 1) -> torch.Tensor:
    """This micro-batch's sum of token losses times ``world_size / global_targets``: backward it, and
    gradients averaged over ranks add up to the gradient of the global token-mean loss."""
    if global_targets < 1:
        raise ValueError(f"global_targets must be >= 1, got {global_targets}")
    return token_losses(logits, labels).sum() * (world_size / global_targets)
