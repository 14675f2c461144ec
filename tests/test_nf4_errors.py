"""Bad input to every public nf4 function: a ValueError/TypeError that names the argument (or state-dict
field), never an IndexError deep inside and never silently wrong weights."""
import json

import pytest
import torch

import nf4


def qweight(double_quant=True, **changes):
    return nf4.quantize(torch.randn(16, 64), double_quant=double_quant).with_tensors(**changes)


@pytest.mark.parametrize("call, error, words", [
    (lambda: nf4.quantize(torch.randn(64), double_quant="yes"), TypeError, "double_quant must be True or False"),
    (lambda: nf4.quantize(torch.randn(64), block_size=True), TypeError, "block_size must be an int"),
    (lambda: nf4.quantize(torch.randn(64), block_size=48), ValueError, "block_size must be one of"),
    (lambda: nf4.quantize(torch.arange(64)), TypeError, r"w.dtype must be torch.float32"),
    (lambda: nf4.quantize(None), TypeError, "w must be a torch.Tensor"),
    (lambda: nf4.quantize(torch.tensor([1.0, float("nan")] * 40)), ValueError, "NaN or Inf"),
    (lambda: nf4.quantize_reference(torch.empty(0)), ValueError, "empty"),
    (lambda: nf4.quantize_reference(torch.randn(64), 64, 1), TypeError, "double_quant"),
    (lambda: nf4.dequantize(qweight(), dtype=torch.int8), TypeError, "dtype must be torch.float32"),
    (lambda: nf4.dequantize(qweight(), backend="cuda"), ValueError, "backend must be one of"),
    (lambda: nf4.dequantize(torch.randn(3)), TypeError, "qw must be an nf4.QuantizedWeight"),
    (lambda: nf4.dequantize_reference("qw"), TypeError, "qw must be an nf4.QuantizedWeight"),
    (lambda: nf4.dequantize(qweight(packed=torch.zeros(7, dtype=torch.uint8))), ValueError, "qw.packed has 7 values"),
    (lambda: nf4.dequantize(qweight(packed=torch.zeros(512))), TypeError, "qw.packed must be torch.uint8"),
    (lambda: nf4.dequantize(qweight(absmax=torch.zeros(3, dtype=torch.uint8))), ValueError, "qw.absmax .* 3 values"),
    (lambda: nf4.dequantize(qweight(False, absmax=torch.zeros(16, dtype=torch.uint8))), TypeError, "torch.float32"),
    (lambda: nf4.dequantize(qweight(nested_absmax=torch.zeros(2))), ValueError, "nested_absmax has 2 values"),
    (lambda: nf4.dequantize(qweight(offset=None)), ValueError, "nested_absmax and offset go together"),
    (lambda: nf4.dequantize(qweight(offset=torch.zeros(1, dtype=torch.float64))), TypeError, "qw.offset"),
    (lambda: nf4.dequantize(qweight(block_size=48)), ValueError, "qw.block_size must be one of"),
    (lambda: nf4.dequantize(qweight(shape=(16, 64))), TypeError, "qw.shape must be a torch.Size"),
    (lambda: nf4.dequantize(qweight(dtype=torch.int32)), TypeError, "qw.dtype"),
    (lambda: nf4.dequantize(qweight(), out=torch.empty(16, 64, dtype=torch.bfloat16)), TypeError, "out has dtype"),
    (lambda: nf4.dequantize(qweight(), out=torch.empty(64, 16)), ValueError, "out has shape"),
    (lambda: nf4.dequantize(qweight(), out=torch.empty(64, 16).t()), ValueError, "contiguous"),
    (lambda: nf4.dequantize(qweight(), out=[0.0]), TypeError, "out must be a torch.Tensor"),
    (lambda: nf4.to_bnb_state_dict(qweight(), prefix=3), TypeError, "prefix must be a str"),
    (lambda: nf4.to_bnb_state_dict("qw"), TypeError, "QuantizedWeight"),
    (lambda: nf4.from_bnb_state_dict([1, 2]), TypeError, "sd must be a state dict"),
    (lambda: nf4.Linear4bit(qweight(), compute_dtype=torch.int8), TypeError, "compute_dtype"),
    (lambda: nf4.Linear4bit(qweight(), bias=[0.0] * 16), TypeError, "bias must be a torch.Tensor"),
    (lambda: nf4.Linear4bit(qweight(absmax=torch.zeros(1, dtype=torch.uint8))), ValueError, "qweight.absmax"),
    (lambda: nf4.Linear4bit.from_linear(torch.nn.Conv1d(2, 2, 1)), TypeError, "linear must be a torch.nn.Linear"),
    (lambda: nf4.Linear4bit.from_linear(torch.nn.Linear(64, 4), block_size=100), ValueError, "block_size"),
    (lambda: nf4.Linear4bit.from_bnb_state_dict({}, prefix=None), TypeError, "prefix must be a str"),
    (lambda: nf4.Linear4bit(qweight()).set_weight([[0.0]]), TypeError, "w must be a torch.Tensor"),
])
def test_bad_argument_is_named(call, error, words):
    with pytest.raises(error, match=words):
        call()


def state_dict(double_quant=True):
    return nf4.to_bnb_state_dict(nf4.quantize(torch.randn(16, 64), double_quant=double_quant))


def with_meta(sd, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta.update(changes)
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("change, words", [
    # wrong length: would broadcast over the blocks and load wrong weights
    (lambda sd: sd.update({"weight.nested_absmax": torch.ones(2)}), r"nested_absmax has 2 values \(shape \(2,\)\); 1 expected"),
    (lambda sd: sd.update({"weight.nested_absmax": torch.tensor([float("nan")])}), "nested_absmax must hold finite"),
    (lambda sd: sd.update({"weight.nested_absmax": torch.ones(1, dtype=torch.float16)}), "nested_absmax must be torch.float32"),
    (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"].float()}), "absmax .* must be torch.uint8"),
    (lambda sd: with_meta(sd, nested_offset=float("nan")), "nested_offset must be a finite number"),
    (lambda sd: with_meta(sd, nested_offset="0.1"), "nested_offset must be a finite number"),
    (lambda sd: with_meta(sd, nested_blocksize=128), "nested_blocksize must be 256"),
    (lambda sd: with_meta(sd, nested_dtype="float16"), "nested_dtype must be 'float32'"),
    (lambda sd: with_meta(sd, blocksize="64"), "blocksize must be an int"),
    (lambda sd: with_meta(sd, shape=[16, -64]), "shape must be a non-empty list of positive ints"),
    (lambda sd: with_meta(sd, shape="16x64"), "shape must be"),
    (lambda sd: with_meta(sd, quant_type="fp4"), "quant_type must be 'nf4'"),
    (lambda sd: with_meta(sd, dtype="float64"), "dtype must be one of"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}),
     "must be a JSON object"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.zeros(3)}), "uint8 tensor of JSON bytes"),
    (lambda sd: sd.update({"weight.quant_map": torch.zeros(4)}), "quant_map is not the NF4 table"),
    (lambda sd: sd.update({"weight.absmax": [1, 2]}), "weight.absmax must be a torch.Tensor"),
])
def test_bad_double_quant_state_dict_is_named(change, words):
    sd = state_dict()
    change(sd)
    with pytest.raises((ValueError, TypeError), match=words):
        nf4.from_bnb_state_dict(sd)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_plain_absmax_is_named(bad):
    sd = state_dict(double_quant=False)
    sd["weight.absmax"][3] = bad
    with pytest.raises(ValueError, match="weight.absmax must hold finite, non-negative scales"):
        nf4.from_bnb_state_dict(sd)


def test_a_valid_state_dict_still_loads_exactly():
    qw = nf4.quantize(torch.randn(16, 64))
    back = nf4.from_bnb_state_dict(nf4.to_bnb_state_dict(qw))
    assert torch.equal(back.dequantize(), qw.dequantize())
