"""The baseline NF4 is measured against: plain 4-bit integer absmax quantization (QLoRA section 3 and Table 2
compare NF4 with it at equal bits). Per block of ``block_size`` values, 15 evenly spaced levels:

    q = round(w / absmax * 7) in -7..7,    w_hat = q * absmax / 7        (fp32)

Only the round trip is needed (for error and held-out-loss comparisons), so it returns w_hat directly.
"""
import torch

from .checks import check_block_size, check_weight


def int4_absmax_roundtrip(w: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """``w`` quantized to Int4 absmax and back, fp32, same shape; ``w.numel()`` must be a multiple of the block."""
    check_weight(w)
    check_block_size(block_size)
    if w.numel() % block_size:
        raise ValueError(f"w has {w.numel()} values (shape {tuple(w.shape)}): not a multiple of block_size {block_size}")
    blocks = w.float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.round(blocks / absmax * 7).clamp(-7, 7) * absmax / 7).reshape(w.shape)
