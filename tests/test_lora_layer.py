"""LoRALinear: init, scaling, bad input, what autograd saves, gradients vs plain autograd, DoRA vs PEFT, merge."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lora
from reference_libs import reference
from test_lora_fake_base import FakeQuantLinear

IN, OUT, R, TOKENS = 24, 20, 4, 6  # TOKENS != OUT, so no activation can have the weight's shape by accident


def make_base(kind: str, dtype=torch.float32, bias=True) -> nn.Module:
    linear = nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    return linear if kind == "linear" else FakeQuantLinear(linear)


def randomize_adapter(layer: lora.LoRALinear) -> None:
    """Non-zero B (and a non-trivial magnitude) so every gradient path is exercised."""
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        if layer.dora:
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector))


def reference_forward(layer: lora.LoRALinear, x, A, B, magnitude=None):
    """The layer's math in plain autograd on a dense copy of the base weight (requires_grad=False)."""
    W = lora.dequantized_weight(layer.base_layer, x.dtype)
    b = layer.base_layer.bias
    s = layer.scaling
    out = F.linear(x, W) + s * F.linear(F.linear(x, A), B)
    if magnitude is not None:  # DoRA, Eq. 5 with the detached norm
        out = magnitude / torch.linalg.vector_norm(W + s * B @ A, dim=1).detach() * out
    return out if b is None else out + b.to(x.dtype)


@pytest.mark.parametrize("kind", ["linear", "fake-quantized"])
@pytest.mark.parametrize("dora", [False, True])
def test_step_zero_equals_base_and_init_follows_lora(kind, dora):
    torch.manual_seed(0)
    base = make_base(kind)
    layer = lora.LoRALinear(base, r=R, alpha=16, dora=dora)
    x = torch.randn(TOKENS, IN)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    assert layer.lora_A.weight.shape == (R, IN) and layer.lora_B.weight.shape == (OUT, R)  # PEFT's shapes
    assert torch.all(layer.lora_B.weight == 0)
    bound = 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > bound / 2
    assert all(not p.requires_grad for p in base.parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == \
        {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if dora else set())


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_lora_and_rslora(rslora, expected):
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base("linear"), r=R, alpha=16, rslora=rslora)
    randomize_adapter(layer)
    assert layer.scaling == expected
    x = torch.randn(TOKENS, IN)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + expected * x @ A.T @ B.T)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must"), ({"r": -2}, "r must"), ({"r": 21}, "r must"), ({"r": 2.0}, "r must"),
    ({"alpha": 0}, "alpha must"), ({"alpha": -1.0}, "alpha must"),
    ({"dropout": -0.1}, "dropout must"), ({"dropout": 1.0}, "dropout must"),
])
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.LoRALinear(make_base("linear"), **kwargs)


def test_bad_base_and_bad_input_are_named():
    with pytest.raises(TypeError, match="linear-like"):
        lora.LoRALinear(nn.Embedding(10, 4))
    layer = lora.LoRALinear(make_base("linear"), r=R)
    with pytest.raises(ValueError, match="in_features = 24"):
        layer(torch.randn(TOKENS, IN + 1))


def saved_shapes(layer, x):
    layer.zero_grad()
    out, records = lora.record_saved_tensors(layer, x, module=layer)
    out.float().square().sum().backward()  # the recorded graph is a working one
    assert x.grad is not None and layer.lora_A.weight.grad is not None
    return records


@pytest.mark.parametrize("kind", ["linear", "fake-quantized"])
@pytest.mark.parametrize("dora, dropout", [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)])
def test_saved_tensors_never_include_the_base_weight(kind, dora, dropout):
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base(kind), r=R, dora=dora, dropout=dropout).train()
    randomize_adapter(layer)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    records = saved_shapes(layer, x)
    print(f"\n{kind} dora={dora} dropout={dropout}:", *records, sep="\n  ")
    shapes = [r.shape for r in records]
    assert (OUT, IN) not in shapes and (IN, OUT) not in shapes, shapes
    # Only what the adapter gradients need: x-sized inputs of A, r-sized inputs of B, out-sized DoRA terms.
    allowed = {(TOKENS, IN), (R, IN), (IN, R), (TOKENS, R), (OUT, R), (R, OUT), (TOKENS, OUT), (OUT,)}
    assert set(shapes) <= allowed, shapes
    # at most: x and dropout's mask, A x, two [tokens, out] DoRA terms, a few [out] vectors (fp32)
    assert lora.activation_bytes(records) <= 4 * (TOKENS * (2 * IN + R + 2 * OUT) + 4 * OUT)


def test_the_saved_tensor_check_can_fail():
    """Control: the same math in plain autograd over the fake base keeps a dequantized [out, in] weight."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base("fake-quantized"), r=R)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    plain = lambda t: layer.base_layer(t) + layer.scaling * layer.lora_B(layer.lora_A(t))  # noqa: E731
    _, records = lora.record_saved_tensors(plain, x, module=layer)
    assert (OUT, IN) in [r.shape for r in records] or (IN, OUT) in [r.shape for r in records]


@pytest.mark.parametrize("kind", ["linear", "fake-quantized"])
@pytest.mark.parametrize("dora", [False, True])
def test_gradients_match_plain_autograd_fp32(kind, dora):
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base(kind), r=R, alpha=8, dora=dora)
    randomize_adapter(layer)
    x = torch.randn(2, TOKENS, IN, requires_grad=True)
    grad_out = torch.randn(2, TOKENS, OUT)
    layer(x).backward(grad_out)
    ours = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    ours += [layer.lora_magnitude_vector.grad] if dora else []

    leaves = [x.detach().clone().requires_grad_(), layer.lora_A.weight.detach().clone().requires_grad_(),
              layer.lora_B.weight.detach().clone().requires_grad_()]
    leaves += [layer.lora_magnitude_vector.detach().clone().requires_grad_()] if dora else []
    reference_forward(layer, *leaves).backward(grad_out)
    for mine, theirs in zip(ours, leaves, strict=True):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "fake-quantized"])
@pytest.mark.parametrize("dora", [False, True])
def test_gradcheck_fp64(kind, dora):
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base(kind, dtype=torch.float64), r=R, dora=dora, dtype=torch.float64)
    randomize_adapter(layer)
    # DoRA's norm is detached on purpose (paper Sec. 4.3), so its analytic gradient w.r.t. A and B is not
    # the numerical one; there the check covers x and the magnitude, and A, B are compared with plain
    # autograd above.
    names = ["lora_magnitude_vector"] if dora else ["lora_A.weight", "lora_B.weight"]
    params = [dict(layer.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    x = torch.randn(3, IN, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_dropout_is_applied_to_the_adapter_input_only():
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base("fake-quantized"), r=R, dropout=0.5).train()
    randomize_adapter(layer)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    x_d = F.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + layer.scaling * x_d @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(out, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(layer, x, layer.lora_A.weight, layer.lora_B.weight))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_matches_peft(dropout):
    """Magnitude init (row norms of W, shape [out]) and forward/backward, train mode, with PEFT's DoRA."""
    peft = reference("peft")
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(IN, OUT))
    model.proj.load_state_dict(base.state_dict())
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                                         target_modules=["proj"], init_lora_weights=True))
    ours = lora.LoRALinear(base, r=R, alpha=8, dropout=dropout, dora=True)
    peft_layer = theirs.base_model.model.proj
    torch.testing.assert_close(ours.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight)
    torch.testing.assert_close(ours.lora_magnitude_vector, base.weight.norm(dim=1))
    randomize_adapter(ours)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    theirs.train(), ours.train()
    x = torch.randn(TOKENS, IN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(5)
    y_ours = ours(x)
    torch.manual_seed(5)
    y_theirs = theirs(x2)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_ours.square().sum().backward(), y_theirs.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_magnitude_vector.grad,
                               peft_layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_float_base(dora):
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base("linear"), r=R, dora=dora)
    randomize_adapter(layer)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(TOKENS, IN)
    before = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(layer.base_layer.weight, original)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), before, rtol=1e-5, atol=1e-5)  # the base alone now
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_into_quantized_base_requantizes_and_warns():
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base("fake-quantized"), r=R)
    randomize_adapter(layer)
    x = torch.randn(TOKENS, IN)
    before = layer(x)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert layer.base_layer.weight.codes.dtype == torch.int8  # still quantized, through its own quantizer
    step = layer.base_layer.weight.scale.max()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=IN * step.item())
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.unmerge()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=2 * IN * step.item())


def test_merge_into_a_base_without_a_quantizer_is_a_type_error():
    layer = lora.LoRALinear(make_base("fake-quantized"), r=R)
    layer.base_layer.set_weight = None
    with pytest.warns(UserWarning), pytest.raises(TypeError, match="set_weight"):
        layer.merge()


def test_activation_checkpointing_gives_the_same_gradients():
    """The recipe recomputes each layer in backward (torch.utils.checkpoint); FrozenLinear must allow it."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(make_base("fake-quantized"), r=R, dora=True)
    randomize_adapter(layer)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad(), setattr(x, "grad", None)
        out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        out.square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in lora.trainable_parameters(layer)])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)


def test_importing_lora_imports_no_quantization_library():
    import subprocess
    import sys
    code = "import sys, lora; print(sorted(m for m in ('bitsandbytes', 'nf4', 'peft') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_update_is_added_in_place_onto_the_base_output():
    """Adapter and base in one dtype: the output is the base output's own memory (no [tokens, out]
    temporary), and equals base(x) + s * (A x) B^T computed apart, for a 3-D input."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False)
    outputs = []
    base.register_forward_hook(lambda module, args, out: outputs.append(out))
    layer = lora.LoRALinear(base, r=R, alpha=8)
    randomize_adapter(layer)
    x = torch.randn(2, TOKENS, IN)
    y = layer(x)
    assert y.shape == (2, TOKENS, OUT) and y.data_ptr() == outputs[0].data_ptr()
    expected = torch.addmm(x.reshape(-1, IN) @ base.weight.t(), x.reshape(-1, IN) @ layer.lora_A.weight.t(),
                           layer.lora_B.weight.t(), alpha=layer.scaling)
    assert torch.equal(y.reshape(-1, OUT), expected)


def test_frozen_linear_flatten_gives_the_same_output_and_gradient():
    torch.manual_seed(0)
    base = make_base("fake-quantized", bias=False)
    x = torch.randn(2, TOKENS, IN)
    grad = torch.randn(2 * TOKENS, OUT)
    outputs, grads = [], []
    for flatten in (False, True):
        leaf = x.clone().requires_grad_()
        y = lora.frozen_linear(base, leaf, flatten=flatten)
        y.backward(grad.view(y.shape))
        outputs.append(y.reshape(-1, OUT))
        grads.append(leaf.grad)
        assert y.shape == ((2 * TOKENS, OUT) if flatten else (2, TOKENS, OUT)) and y._base is None
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
