"""nf4/linear.py: a frozen NF4 linear layer whose autograd keeps no dequantized weight."""
import copy

import pytest
import torch

import nf4


def make(double_quant=True, bias=True, dtype=torch.float32, compute_dtype=None):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    return linear, nf4.Linear4bit.from_linear(linear, double_quant=double_quant, compute_dtype=compute_dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_gradient_match_the_dense_dequantized_layer(double_quant, bias):
    linear, layer = make(double_quant, bias)
    w = layer.weight.dequantize()
    x = torch.randn(2, 3, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), torch.nn.functional.linear(x_ref, w, linear.bias.detach() if bias else None)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert (layer.in_features, layer.out_features) == (96, 40)


def test_quantized_tensors_are_frozen_parameters_and_get_no_gradient():
    _, layer = make()
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset", "bias"}
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in layer.parameters())


def test_autograd_saves_no_tensor_of_the_weights_shape():
    """Count what autograd keeps for backward: nothing may have the (dequantized) weight's shape."""
    _, layer = make()
    lora_a = torch.nn.Linear(96, 4, bias=False)  # a trainable neighbour, so the graph saves something
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(8, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x) + lora_a(x).sum()
    y.sum().backward()
    assert saved, "the hook saw nothing: the check could not have failed"
    assert (40, 96) not in saved and (96, 40) not in saved, saved


def test_dense_layer_would_be_caught():
    """The same count on a plain dequantize-then-matmul does see the weight: the check above can fail."""
    _, layer = make()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        x = torch.randn(8, 96, requires_grad=True)
        torch.nn.functional.linear(x, layer.weight.dequantize().requires_grad_(True)).sum().backward()
    assert (40, 96) in saved or (96, 40) in saved


def test_compute_dtype_and_output_dtype():
    _, layer = make(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = (x.bfloat16() @ layer.weight.dequantize(torch.bfloat16).t() + layer.bias.bfloat16()).float()
    assert torch.equal(y, expected)


def test_casting_the_model_keeps_the_quantized_dtypes():
    _, layer = make(double_quant=False)
    before = layer.weight.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.weight_absmax.dtype == torch.float32 and layer.weight_packed.dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight.dequantize(torch.float32), before)


def test_weight_follows_the_modules_current_tensors():
    """A sharding layer may swap the parameters' data for gathered copies; ``weight`` must see them."""
    _, layer = make()
    expected = layer.weight.dequantize()
    for name, param in layer.named_parameters():
        param.data = param.data.clone()
    assert torch.equal(layer.weight.dequantize(), expected)
    layer.weight_absmax.data = torch.zeros_like(layer.weight_absmax)
    assert not torch.equal(layer.weight.dequantize(), expected)


def test_set_weight_requantizes_in_place():
    _, layer = make()
    new = torch.randn(40, 96)
    layer.set_weight(new)
    assert torch.equal(layer.weight.dequantize(), nf4.quantize(new).dequantize())
    assert not layer.weight_packed.requires_grad
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight(torch.randn(3, 3))


def test_from_bnb_state_dict_round_trip():
    _, layer = make()
    again = nf4.Linear4bit.from_bnb_state_dict({"q_proj." + k: v for k, v in layer.bnb_state_dict().items()},
                                               prefix="q_proj.")
    x = torch.randn(3, 96)
    assert torch.equal(again(x), layer(x))


def test_deepcopy_and_errors():
    _, layer = make()
    assert torch.equal(copy.deepcopy(layer)(torch.ones(1, 96)), layer(torch.ones(1, 96)))
    with pytest.raises(ValueError, match="2-D"):
        nf4.Linear4bit(nf4.quantize(torch.randn(64)))
    with pytest.raises(ValueError, match="bias"):
        nf4.Linear4bit(nf4.quantize(torch.randn(4, 64)), bias=torch.zeros(5))


def test_tensors_re_registered_as_buffers_keep_working():
    """recipe/ moves them to buffers for FSDP2; weight, casting and set_weight must still work."""
    _, layer = make(double_quant=False)
    for name in [n for n, _ in layer.named_parameters() if n.startswith("weight_")]:
        tensor = getattr(layer, name).data
        del layer._parameters[name]
        layer.register_buffer(name, tensor)
    before = layer.weight.dequantize()
    layer.to(torch.bfloat16)
    assert layer.weight_absmax.dtype == torch.float32 and torch.equal(layer.weight.dequantize(torch.float32), before)
    new = torch.randn(40, 96)
    layer.set_weight(new)
    assert "weight_packed" in dict(layer.named_buffers())
    assert torch.equal(layer.weight.dequantize(), nf4.quantize(new, double_quant=False).dequantize())


def test_cpu_workspace_is_reused_and_gives_the_same_values():
    """Forward and backward dequantize into one reused buffer per thread and dtype: same results as without."""
    from nf4 import linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64)
    layer = nf4.Linear4bit.from_linear(dense)
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    w = layer.weight.dequantize()
    assert torch.equal(y, x @ w.t() + dense.bias) and torch.equal(x.grad, torch.ones(3, 64) @ w)
    workspace = linear._workspaces.__dict__[torch.float32]
    layer(x)
    assert linear._workspaces.__dict__[torch.float32] is workspace  # reused, not reallocated
    small = nf4.Linear4bit.from_linear(torch.nn.Linear(64, 32))
    assert torch.equal(small(x[:, :64]), x[:, :64] @ small.weight.dequantize().t() + small.bias)
