"""`LoRALinear`: a frozen linear-like base plus a trainable low-rank update (LoRA, rsLoRA, DoRA).

LoRA (Hu et al. 2021, Eq. 3):   y = W x + b + s * B A x,   A: [r, in], B: [out, r],   s = alpha / r
rsLoRA (Kalajdzievski 2023):    s = alpha / sqrt(r), so the update's scale does not vanish as r grows.
DoRA (Liu et al. 2024, Eq. 5):  y = m / ||W + s B A||_c * (W + s B A) x + b,   the norm detached (Sec. 4.3)

A starts Kaiming-uniform (a = sqrt(5), as ``nn.Linear``) and B at zero, so at step 0 the layer computes
exactly ``base(x)``. The names ``lora_A``, ``lora_B`` (``nn.Linear`` without bias, so their weights have
PEFT's shapes ``[r, in]`` and ``[out, r]``), ``lora_magnitude_vector`` and ``base_layer`` make this
module's state-dict keys PEFT's, minus PEFT's adapter name.

The base runs through `FrozenLinear` (frozen.py): no weight gradient, nothing saved, the weight
dequantized again in backward. The adapter runs in plain autograd in ``dtype`` (float32 by default,
like PEFT's ``autocast_adapter_dtype``); the input is cast to it and the update cast back. The scale s
multiplies the small ``[tokens, r]`` tensor ``A x``, never a ``[tokens, out]`` one; when the adapter and
the base compute in one dtype, ``base(x).addmm_(A x, B^T, alpha=s)`` adds the update inside the B GEMM,
in place on the base output (which nothing saved for backward), so the forward allocates no
``[tokens, out]`` tensor beyond the base output (PEFT allocates three more: the B output, its scaled
copy, and the sum). The base output is asked for as ``[tokens, out]`` (``frozen_linear(flatten=True)``),
a tensor of its own, not a view, so it can be updated in place.
"""
import math

import torch
from torch import nn

from .base_weight import dequantized_weight, is_linear_like, replace_weight
from .frozen import frozen_linear


def check_hyperparameters(r, alpha, dropout=0.0, rslora=False, dora=False, dtype=torch.float32) -> None:
    """TypeError/ValueError naming the argument unless r is an int >= 1, alpha a finite number > 0,
    0 <= dropout < 1, rslora and dora bools, and dtype a floating-point torch.dtype."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1; got {r!r}")
    for name, value in (("alpha", alpha), ("dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number; got {value!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    for name, value in (("rslora", rslora), ("dora", dora)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool; got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")


class LoRALinear(nn.Module):
    """``base(x) + s * B(A(dropout(x)))`` over a frozen linear-like ``base`` (module docstring).

    r: rank, 1 <= r <= min(in, out); alpha: the scale numerator; dropout: on the adapter's input only;
    rslora: s = alpha / sqrt(r); dora: add DoRA's magnitude vector; dtype: of the adapter weights.
    The base is frozen in place (``requires_grad_(False)``).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"base must be linear-like (in_features, out_features, weight); got {type(base).__name__}")
        check_hyperparameters(r, alpha, dropout, rslora, dora, dtype)
        in_features, out_features = base.in_features, base.out_features
        if r > min(in_features, out_features):
            raise ValueError(f"r must be <= min(in_features, out_features) = {min(in_features, out_features)}; got {r}")
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base_tensors = [*base.parameters(), *base.buffers()]
        device = base_tensors[0].device if base_tensors else None
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = nn.Parameter(self._initial_magnitude()) if dora else None
        self.merged = False
        self._merged_norm = None  # DoRA: the norm used by merge, needed to undo it exactly

    def _initial_magnitude(self) -> torch.Tensor:
        """DoRA's m at step 0: ``||W||_c`` (B = 0). A zero row would make the gain m / ||.|| = 0 / 0."""
        norm = self.weight_norm()
        if norm.device.type == "meta":  # a model built on meta (export, layer-by-layer loading): no values yet
            return norm
        if not torch.isfinite(norm).all() or (norm == 0).any():
            rows = torch.nonzero(~torch.isfinite(norm) | (norm == 0)).flatten()[:5].tolist()
            raise ValueError(f"dora=True needs a finite, non-zero norm for every output row of the base weight; "
                             f"rows {rows} are zero or non-finite")
        return norm

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``s * B @ A``, shape [out, in], in the adapter dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """DoRA's ``||W + s B A||_c``: one L2 norm per output feature, shape [out] (detached).

        The paper's W is [in, out] acting as ``x W``, so its columns are output features; PyTorch
        stores [out, in], so it is the norm over dim=1 -- PEFT's ``lora_magnitude_vector``.
        """
        weight = dequantized_weight(self.base_layer, self.lora_A.weight.dtype)
        return torch.linalg.vector_norm(weight + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"input x must be a floating-point tensor; got {getattr(x, 'dtype', type(x).__name__)}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"input x has shape {tuple(x.shape)}, expected [..., in_features = {self.in_features}]")
        if self.merged:
            return frozen_linear(self.base_layer, x)
        # first the base, then the adapter: the order autograd adds their gradients for x in, bit for bit
        result = frozen_linear(self.base_layer, x, flatten=not self.dora)  # [tokens, out]: updatable in place
        x_lora = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        down = self.lora_A(x_lora)  # [..., r]
        if self.dora:
            return self._dora_forward(x, x_lora, result, self.lora_B(down * self.scaling))
        if down.dtype == result.dtype:  # s * down @ B^T added onto the base output in place, inside the B GEMM
            result.addmm_(down.reshape(-1, self.r), self.lora_B.weight.t(), alpha=self.scaling)
        else:  # s applied to the small [.., r] tensor
            result = result + self.lora_B(down * self.scaling).reshape(-1, self.out_features).to(result.dtype)
        return result.view(*x.shape[:-1], self.out_features)

    def _dora_forward(self, x, x_lora, result, update):
        """PEFT's DoRA: ``base(x) + (g - 1) W x_d + g s B A x_d``, ``g = m / ||W + s B A||`` detached.

        Without dropout (``x_d = x``) that is exactly DoRA's ``g (W x + s B A x) + b``, and ``W x`` is
        read off the base output; with dropout PEFT recomputes ``W x_d``, and so do we.
        """
        gain = self.lora_magnitude_vector / self.weight_norm()
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result if bias is None else result - bias
        else:
            base_out = frozen_linear(self.base_layer, x_lora.to(x.dtype))
            base_out = base_out if bias is None else base_out - bias
        return (result + (gain - 1) * base_out + gain * update).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: ``W <- W + s B A`` (DoRA: ``g (W + s B A)``)."""
        if self.merged:
            return
        weight = dequantized_weight(self.base_layer, torch.float32)
        merged = weight + self.delta_weight().float()
        if self.dora:
            self._merged_norm = torch.linalg.vector_norm(merged, dim=1)
            merged = (self.lora_magnitude_vector.float() / self._merged_norm)[:, None] * merged
        replace_weight(self.base_layer, merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to rounding of the base's storage dtype or quantizer)."""
        if not self.merged:
            return
        weight = dequantized_weight(self.base_layer, torch.float32)
        if self.dora:
            weight = weight / (self.lora_magnitude_vector.float() / self._merged_norm)[:, None]
        replace_weight(self.base_layer, weight - self.delta_weight().float())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, rslora={self.rslora}, dora={self.dora}, merged={self.merged}")
