"""QLoRA: our LoRALinear over a 4-bit base (bitsandbytes Linear4bit) against PEFT's LoRA over the same base."""
import copy

import pytest
import torch
from torch import nn

import lora
from reference_libs import reference

IN, OUT, R, TOKENS = 128, 96, 8, 10


def bnb_linear4bit(linear: nn.Linear, compute_dtype=torch.bfloat16) -> nn.Module:
    """bitsandbytes' NF4 Linear4bit (double quantization, block 64) holding ``linear``'s weights."""
    bnb = reference("bitsandbytes")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # bitsandbytes quantizes on .to(device)


def float_linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT).to(torch.bfloat16)


def peft_over(base: nn.Module, dora: bool):
    """PEFT's LoRA around ``base`` (module name "proj") and its LoRA layer."""
    peft = reference("peft")
    model = nn.Sequential()
    model.add_module("proj", base)
    model.is_loaded_in_4bit = True  # what from_pretrained(load_in_4bit) sets: PEFT then uses its bnb layer
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=16, target_modules=["proj"], use_dora=dora))
    return wrapped, wrapped.base_model.model.proj


def copy_adapter_into_peft(ours: lora.LoRALinear, peft_layer) -> None:
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.05)
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if ours.dora:
            peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)


def forward_backward(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_out)
    return y, x.grad


def assert_matches_peft(ours: lora.LoRALinear, theirs, peft_layer) -> None:
    """Same bf16 input and output gradient through both: outputs, dL/dx, dL/dA, dL/dB agree within bf16
    tolerance, and DoRA's magnitude too (both initialise it from the dequantized 4-bit weight's row norms;
    PEFT sums them in bf16)."""
    if ours.dora:
        torch.testing.assert_close(ours.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight,
                                   rtol=4e-3, atol=0)
    copy_adapter_into_peft(ours, peft_layer)
    x = torch.randn(2, TOKENS, IN, dtype=torch.bfloat16)
    grad_out = torch.randn(2, TOKENS, OUT, dtype=torch.bfloat16)
    y_ours, gx_ours = forward_backward(ours, x, grad_out)
    y_theirs, gx_theirs = forward_backward(theirs, x, grad_out)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours, y_theirs, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_ours, gx_theirs, rtol=2e-2, atol=2e-2)
    for name in ("lora_A", "lora_B"):
        mine, peft_grad = getattr(ours, name).weight.grad, getattr(peft_layer, name)["default"].weight.grad
        torch.testing.assert_close(mine, peft_grad, rtol=2e-2, atol=2e-2 * peft_grad.abs().max().item())


@pytest.mark.parametrize("dora", [False, True])
def test_ours_over_bnb_matches_peft_over_bnb(dora):
    """Same bf16 compute, same 4-bit weight: outputs and gradients agree within bf16 tolerance."""
    linear = float_linear()
    ours = lora.LoRALinear(bnb_linear4bit(linear), r=R, alpha=16, dora=dora)
    theirs, peft_layer = peft_over(bnb_linear4bit(linear), dora)
    assert_matches_peft(ours, theirs, peft_layer)


@pytest.mark.parametrize("dora", [False, True])
def test_over_bnb_no_saved_tensor_has_the_weight_shape_and_we_save_no_more_than_peft(dora):
    linear = float_linear()
    ours = lora.LoRALinear(bnb_linear4bit(linear), r=R, dora=dora)
    theirs, _ = peft_over(bnb_linear4bit(linear), dora)
    x = torch.randn(TOKENS, IN, dtype=torch.bfloat16, requires_grad=True)
    _, ours_saved = lora.record_saved_tensors(ours, x, module=ours)
    _, peft_saved = lora.record_saved_tensors(theirs, x, module=theirs)
    shapes = [r.shape for r in ours_saved]
    assert (OUT, IN) not in shapes and (IN, OUT) not in shapes, shapes
    assert lora.activation_bytes(ours_saved) <= lora.activation_bytes(peft_saved)


def test_merge_into_bnb_requantizes_warns_and_rounds_like_peft():
    """Both merge by dequantize + add + re-quantize with bitsandbytes; we keep the weight's dtype (bf16)
    where PEFT quantizes the float32 sum, so a few codes differ and the rounding error is comparable."""
    linear = float_linear()
    ours = lora.LoRALinear(bnb_linear4bit(linear), r=R, alpha=16)
    theirs, peft_layer = peft_over(bnb_linear4bit(linear), dora=False)
    copy_adapter_into_peft(ours, peft_layer)
    x = torch.randn(TOKENS, IN, dtype=torch.bfloat16)
    exact = nn.functional.linear(x.float(), linear.weight.float() + ours.delta_weight().float(), linear.bias.float())
    with pytest.warns(UserWarning, match="re-quantizes"):
        lora.merge(nn.Sequential(ours))
    with pytest.warns(UserWarning, match="rounding"):
        theirs.merge_adapter()
    weight = ours.base_layer.weight
    assert weight.dtype == torch.uint8 and weight.quant_state.dtype == torch.bfloat16  # still 4-bit, same dtype
    assert (weight.data == peft_layer.base_layer.weight.data).float().mean() > 0.95
    torch.testing.assert_close(ours(x), ours.base_layer(x))  # merged: the base alone computes it
    ours_error = (ours(x).float() - exact).abs().max()
    peft_error = (theirs(x).float() - exact).abs().max()
    assert ours_error <= 1.5 * peft_error, (ours_error, peft_error)


def test_count_parameters_matches_peft_over_bnb():
    peft = reference("peft")
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(IN, IN), nn.ReLU(), nn.Linear(IN, OUT)).to(torch.bfloat16)  # noqa: E731
    float_model = make()
    quantized = nn.Sequential(bnb_linear4bit(float_model[0]), nn.ReLU(), bnb_linear4bit(float_model[2]))
    theirs = peft.get_peft_model(copy.deepcopy(quantized), peft.LoraConfig(r=R, target_modules=["0", "2"]))
    lora.inject(quantized, ["0", "2"], r=R)
    assert tuple(lora.count_parameters(quantized)) == theirs.get_nb_trainable_parameters()


# --- the project's own NF4 base: lora never imports nf4, the test puts them together -----------------

def nf4_linear4bit(linear: nn.Linear) -> nn.Module:
    import nf4

    return nf4.Linear4bit.from_linear(linear, block_size=64, double_quant=True, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("dora", [False, True])
def test_ours_over_nf4_matches_peft_over_bnb(dora):
    """nf4 quantizes bit-exactly like bitsandbytes, so over the same float weight the two QLoRA layers
    agree within bf16 tolerance: outputs, dL/dx, dL/dA, dL/dB (and DoRA's magnitude)."""
    linear = float_linear()
    ours = lora.LoRALinear(nf4_linear4bit(linear), r=R, alpha=16, dora=dora)
    theirs, peft_layer = peft_over(bnb_linear4bit(linear), dora)
    assert_matches_peft(ours, theirs, peft_layer)


@pytest.mark.parametrize("dora", [False, True])
def test_over_nf4_no_saved_tensor_has_the_weight_shape(dora):
    layer = lora.LoRALinear(nf4_linear4bit(float_linear()), r=R, dora=dora)
    x = torch.randn(TOKENS, IN, dtype=torch.bfloat16, requires_grad=True)
    out, saved = lora.record_saved_tensors(layer, x, module=layer)
    out.float().sum().backward()
    assert x.grad is not None and all(p.grad is None for p in layer.base_layer.parameters())
    shapes = [r.shape for r in saved]
    assert (OUT, IN) not in shapes and (IN, OUT) not in shapes, shapes


def test_merge_into_nf4_goes_through_its_set_weight_like_bnb():
    """Merging requantizes through nf4.Linear4bit.set_weight; the codes match our merge over bitsandbytes."""
    linear = float_linear()
    over_nf4 = lora.LoRALinear(nf4_linear4bit(linear), r=R, alpha=16)
    over_bnb = lora.LoRALinear(bnb_linear4bit(linear), r=R, alpha=16)
    with torch.no_grad():
        over_nf4.lora_B.weight.normal_(0, 0.05)
        over_bnb.load_state_dict(over_nf4.state_dict(), strict=False)  # same A, B (base keys differ)
    torch.testing.assert_close(over_bnb.lora_B.weight, over_nf4.lora_B.weight)
    x = torch.randn(TOKENS, IN, dtype=torch.bfloat16)
    before = over_nf4(x)
    with pytest.warns(UserWarning, match="re-quantizes"):
        over_nf4.merge(), over_bnb.merge()
    packed_nf4 = over_nf4.base_layer.weight_packed.flatten()
    packed_bnb = over_bnb.base_layer.weight.data.flatten()
    assert (packed_nf4 == packed_bnb).float().mean() > 0.99
    # the few codes that differ sit on rounding ties (the two dequantize in different float orders)
    assert (over_nf4(x).float() - over_bnb(x).float()).abs().mean() < 5e-3
    assert (over_nf4(x) - before).abs().max() < 0.5  # rounded, not broken
