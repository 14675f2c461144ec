"""nf4/bnb_format.py: our state dict IS bitsandbytes' Linear4bit state dict, and we read theirs."""
import copy
import json

import pytest
import torch
from reference_libs import reference

import nf4


def bnb_linear(weight, bias, double_quant):
    """A real bitsandbytes Linear4bit holding ``weight`` in its dtype (quantized by bitsandbytes on .to('cpu'))."""
    bnb = reference("bitsandbytes")
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4", module=layer)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_state_dict_as_bitsandbytes(double_quant, dtype):
    """Same keys in the same order, same dtypes, shapes and values, same JSON bytes."""
    torch.manual_seed(0)
    weight = torch.randn(96, 320).to(dtype)
    theirs = bnb_linear(weight, None, double_quant).state_dict()
    ours = nf4.to_bnb_state_dict(nf4.quantize(weight, double_quant=double_quant))
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key
    assert json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))["quant_type"] == "nf4"


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_loads_ours_and_computes_the_same(double_quant):
    bnb = reference("bitsandbytes")
    torch.manual_seed(1)
    ours = nf4.Linear4bit.from_linear(torch.nn.Linear(128, 64), double_quant=double_quant)
    sd = ours.bnb_state_dict()
    theirs = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    quant_stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], quant_stats, device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(sd["bias"])
    x = torch.randn(5, 128)
    assert torch.equal(theirs(x), ours(x))


@pytest.mark.parametrize("double_quant", [False, True])
def test_we_load_bitsandbytes_and_dequantize_identically(double_quant):
    bnb = reference("bitsandbytes")
    torch.manual_seed(2)
    theirs = bnb_linear(torch.randn(64, 192), torch.randn(64), double_quant)
    qw = nf4.from_bnb_state_dict(theirs.state_dict())
    expected = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(qw.dequantize(), expected)
    layer = nf4.Linear4bit.from_bnb_state_dict(theirs.state_dict())
    x = torch.randn(3, 192)
    assert torch.equal(layer(x), theirs(x))


def test_packed_weight_in_another_storage_dtype():
    """bitsandbytes can store the packed bytes as bf16 (quant_storage, for FSDP); the bytes are what count."""
    qw = nf4.quantize(torch.randn(32, 64))
    sd = nf4.to_bnb_state_dict(qw)
    sd["weight"] = sd["weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    assert torch.equal(nf4.from_bnb_state_dict(sd).dequantize(), qw.dequantize())


def test_round_trip_keeps_everything():
    qw = nf4.quantize(torch.randn(3, 5, 7).half(), block_size=32)
    back = nf4.from_bnb_state_dict(nf4.to_bnb_state_dict(qw, prefix="layer.w"), prefix="layer.w")
    assert back.shape == qw.shape and back.dtype == qw.dtype and back.block_size == 32
    for name, tensor in qw.tensors().items():
        assert torch.equal(getattr(back, name), tensor), name


def broken(change):
    sd = nf4.to_bnb_state_dict(nf4.quantize(torch.randn(16, 64)))
    change(sd)
    return sd


def set_meta(**changes):
    def change(sd):
        meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
        meta.update(changes)
        sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return change


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("weight.absmax"), "missing.*weight.absmax"),
    (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "no 'weight.quant_state"),
    (lambda sd: sd.update({"weight.extra": torch.zeros(1)}), "unexpected.*weight.extra"),
    (lambda sd: sd.update({"weight.quant_map": -sd["weight.quant_map"]}), "not the NF4 table"),
    (lambda sd: sd.update({"weight.nested_quant_map": torch.zeros(256)}), "dynamic map"),
    (lambda sd: sd.update({"weight": sd["weight"][:-1]}), "bytes"),
    (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"][:-1]}), "absmax"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2], dtype=torch.uint8)}), "JSON"),
    (set_meta(quant_type="fp4"), "nf4"),
    (set_meta(blocksize=48), "blocksize must be one of"),
    (set_meta(dtype="int8"), "dtype must be one of"),
    (set_meta(shape=[16, 65]), "bytes"),
])
def test_mismatched_state_dict_is_a_clear_error(change, words):
    with pytest.raises(ValueError, match=words):
        nf4.from_bnb_state_dict(broken(change))


def test_fp4_state_dict_is_refused_with_a_hint():
    sd = broken(lambda sd: None)
    sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="only NF4"):
        nf4.from_bnb_state_dict(copy.copy(sd))
