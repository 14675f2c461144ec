"""The frozen path of a LoRA layer: ``y = base(x)`` whose backward only ever returns dL/dx.

Why a custom autograd Function. Left to plain autograd, the frozen base costs memory for nothing:

* a base that computes ``x @ W.dequantize().T`` hands autograd a dequantized ``[out, in]`` copy of W,
  which autograd keeps alive until backward (for a 4096x4096 layer in bf16: 32 MiB per layer);
* a frozen ``nn.Linear`` costs no copy (autograd saves a view of the parameter itself), but that saved
  view pins the weight tensor of forward time until backward.

``FrozenLinear`` runs the base's own forward with autograd off (so the base's fast path is used and
nothing is recorded), saves **no tensor at all**, and in backward fetches the weight again from the
base -- dequantizing it a second time -- to compute ``dL/dx = dL/dy @ W``. It never produces a weight
gradient. Reading ``base.weight`` at backward time, rather than keeping the forward's tensor, is also
what lets a sharding wrapper free the gathered weight after forward and gather it again for backward.

Beside, not fused. The LoRA path ``scale * B(A(dropout(x)))`` stays in ordinary autograd, *beside* this
Function. Fusing both into one Function would save exactly the same tensors -- ``x`` (or ``dropout(x)``)
for dL/dA and ``A x`` for dL/dB are needed either way, and the base path needs none -- and the same
matmuls. It would buy one elementwise pass in backward (autograd adds the two dL/dx contributions; a
fused backward could accumulate the second inside its GEMM), while losing what autograd gives for free on
the LoRA path: dropout's mask, DoRA's extra terms, dtype casts, and gradient checks against plain PyTorch.
The forward needs no fusion: `LoRALinear` adds ``s * (A x) B^T`` onto this Function's output inside the
B GEMM (``addmm_`` with ``alpha = s``, in place on this Function's output), so no ``[tokens, out]``
temporary is made for the update.
"""
import torch
from torch import nn

from .base_weight import dequantized_weight, is_linear_like


class FrozenLinear(torch.autograd.Function):
    """``base(x)`` with ``dL/dx = dL/dy @ W`` and nothing saved for backward (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module, flatten: bool = False) -> torch.Tensor:
        ctx.base = base  # a reference to the module, not a tensor: no memory, re-read in backward
        ctx.input_dtype, ctx.input_shape = x.dtype, x.shape
        # autograd is off inside Function.forward: the base records nothing
        return base(x.reshape(-1, x.shape[-1])) if flatten else base(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = dequantized_weight(ctx.base, grad_output.dtype)  # dequantize again; freed on return
        return (grad_output @ weight).to(ctx.input_dtype).view(ctx.input_shape), None, None


def frozen_linear(base: nn.Module, x: torch.Tensor, flatten: bool = False) -> torch.Tensor:
    """Apply the frozen ``base`` to ``x`` through `FrozenLinear`. ``flatten``: return ``[tokens, out]``
    (x's leading dimensions flattened), a tensor of its own, not a view, which the caller may update
    in place; the gradient still flows to ``x`` as it is (the same autograd graph as without)."""
    if not isinstance(base, nn.Module) or not is_linear_like(base):
        raise TypeError(f"frozen_linear: base must be a linear-like module; got {type(base).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"frozen_linear: x must be a floating-point tensor; got {getattr(x, 'dtype', type(x).__name__)}")
    return FrozenLinear.apply(x, base, flatten)
