"""A small duck-typed quantized linear layer for the lora tests (lora must work on any such base).

Its weight is an object with ``.dequantize()`` (int8 codes and one scale per row), like nf4's
``QuantizedWeight``; its forward runs in plain autograd, so *it* would keep the dequantized weight for
backward -- which is exactly what lora's FrozenLinear must prevent. It has ``set_weight`` so merge can
store a new weight through its own quantizer.
"""
import torch
import torch.nn.functional as F
from torch import nn


class RowwiseInt8Weight:
    """W ~= codes * scale[:, None]; codes int8 in [-127, 127], one absmax scale per output row."""

    def __init__(self, weight: torch.Tensor):
        self.dtype = weight.dtype
        self.scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.codes = torch.round(weight / self.scale[:, None]).to(torch.int8)
        self.shape = weight.shape

    def dequantize(self, dtype=None) -> torch.Tensor:
        return (self.codes.to(self.scale.dtype) * self.scale[:, None]).to(dtype or self.dtype)


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = RowwiseInt8Weight(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight = RowwiseInt8Weight(weight.to(self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def test_fake_base_is_close_to_its_linear():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    fake = FakeQuantLinear(linear)
    assert fake.weight.codes.dtype == torch.int8
    err = (fake.weight.dequantize() - linear.weight).abs().max()
    assert 0 < err <= linear.weight.abs().max() / 127  # rounding, at most half a step per row (loose bound)
    x = torch.randn(5, 32)
    torch.testing.assert_close(fake(x), linear(x), atol=0.05, rtol=0)
