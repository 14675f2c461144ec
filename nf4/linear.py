"""Linear4bit: a frozen linear layer over an NF4 weight (the base layer of QLoRA, section 3, eq. 5).

    y = x @ dequantize(W)^T + b          (W and b frozen)

Autograd must not keep the dequantized weight alive between forward and backward: for a 70B model
that would be a full-precision copy of every layer. So the matmul is a custom autograd Function
that saves nothing: backward dequantizes W again and returns a gradient for the input only.
Backward reads the layer's quantized tensors as they are at backward time, so a sharding layer that
frees them after forward and gathers them again before backward works unchanged.

The quantized tensors are registered as frozen parameters (``requires_grad=False``) named
``weight_packed``, ``weight_absmax`` and, with double quantization, ``weight_nested_absmax`` and
``weight_offset`` (a 0-dim tensor, as in bitsandbytes); ``layer.weight`` rebuilds a ``QuantizedWeight``
over whatever those currently are, parameters or buffers (a wrapper may re-register them as buffers).
Casting the model (``model.to(torch.bfloat16)``) moves them but keeps their dtypes: the fp32 scales
must stay fp32 for the weight to mean the same thing.

On CPU the dense weight is written into one reused workspace per thread and dtype (``dequantize(out=)``),
the size of the largest layer seen: a fresh weight-sized tensor per call would be page-faulted anew
every time (on a GPU, the caching allocator already reuses freed memory). Safe because the matmul
saves nothing: the dense weight never outlives the call that made it.
"""
import threading

import torch
from torch import nn

from .bnb_format import from_bnb_state_dict, to_bnb_state_dict
from .checks import check_dtype, check_quantized_weight
from .quantize import quantize
from .quantized_weight import QuantizedWeight


_workspaces = threading.local()


def _dense_weight(layer: "Linear4bit", dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight dequantized to ``dtype``; on CPU into this thread's reused workspace."""
    qw = layer.weight
    if qw.device.type != "cpu" or type(qw.packed.data) is not torch.Tensor:  # a GPU, or fake/meta tensors
        return qw.dequantize(dtype)
    buffers = _workspaces.__dict__
    if dtype not in buffers or buffers[dtype].numel() < qw.numel:
        buffers[dtype] = torch.empty(qw.numel, dtype=dtype)
    return qw.dequantize(dtype, out=buffers[dtype][: qw.numel])


class _FrozenNF4Matmul(torch.autograd.Function):
    """x @ W^T for an NF4 weight; saves no tensor for backward; no gradient for W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer = layer  # not a tensor: backward re-reads the layer's (possibly re-gathered) tensors
        return x @ _dense_weight(layer, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ _dense_weight(ctx.layer, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class Linear4bit(nn.Module):
    """Frozen ``y = x W^T + b`` with W stored in NF4; computes in ``compute_dtype`` (default: the input's)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, compute_dtype=None):
        super().__init__()
        check_quantized_weight(qweight, "qweight")
        if compute_dtype is not None:
            check_dtype(compute_dtype, "compute_dtype")
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if len(qweight.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D (out_features, in_features), got shape {tuple(qweight.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self._set_quantized(qweight)
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _set_quantized(self, qw: QuantizedWeight) -> None:
        self.weight_shape, self.weight_dtype, self.block_size = qw.shape, qw.dtype, qw.block_size
        for name in QuantizedWeight.TENSOR_NAMES:
            key, tensor = f"weight_{name}", getattr(qw, name)
            if key in self._buffers:  # re-registered as a buffer (e.g. for FSDP2): keep it one
                self._buffers[key] = tensor
            else:
                self.register_parameter(key, None if tensor is None else nn.Parameter(tensor, requires_grad=False))

    @property
    def weight(self) -> QuantizedWeight:
        """The NF4 weight over this layer's current tensors (has ``.dequantize()``)."""
        tensors = {name: getattr(self, f"weight_{name}") for name in QuantizedWeight.TENSOR_NAMES}
        return QuantizedWeight(shape=self.weight_shape, dtype=self.weight_dtype, block_size=self.block_size, **tensors)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True, compute_dtype=None):
        """Quantize an ``nn.Linear`` (its weight in its own dtype; the bias is kept as is, frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        qw = quantize(linear.weight.detach(), block_size=block_size, double_quant=double_quant)
        return cls(qw, linear.bias, compute_dtype=compute_dtype)

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "", compute_dtype=None):
        """Build from a bitsandbytes ``Linear4bit`` state dict (keys ``{prefix}weight``, ``{prefix}weight.absmax``, ...)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r} ({type(prefix).__name__})")
        return cls(from_bnb_state_dict(sd, prefix + "weight"), sd.get(prefix + "bias"), compute_dtype=compute_dtype)

    def bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """This layer in bitsandbytes' ``Linear4bit`` state-dict format."""
        sd = to_bnb_state_dict(self.weight, prefix + "weight")
        if self.bias is not None:
            sd[prefix + "bias"] = self.bias.detach()
        return sd

    def set_weight(self, w: torch.Tensor) -> None:
        """Re-quantize a new dense weight into this layer (same block size, double quant, dtype), e.g. to merge
        a LoRA update: ``layer.set_weight(layer.weight.dequantize() + delta)``. Lossy: the merged weight is
        rounded to NF4 again."""
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.shape != self.weight_shape:
            raise ValueError(f"w must have shape {tuple(self.weight_shape)}, got {tuple(w.shape)}")
        qw = quantize(w.detach().to(self.weight_dtype), self.block_size, double_quant=self.weight_nested_absmax is not None)
        self._set_quantized(qw.to(self.weight_packed.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        y = _FrozenNF4Matmul.apply(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Move with the model, but never change the quantized tensors' dtypes (see the module docstring)."""
        tensors = list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False))
        keep = {n: t.data for n, t in tensors if n.startswith("weight_")}
        super()._apply(fn, recurse)
        for name, before in keep.items():
            now = getattr(self, name)
            if now.dtype != before.dtype:
                if name in self._buffers:
                    self._buffers[name] = before.to(now.device)
                else:
                    now.data = before.to(now.device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}{dq}, weight_dtype={self.weight_dtype}, compute_dtype={self.compute_dtype}")
