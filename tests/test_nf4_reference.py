"""nf4/reference.py is the definition: the fast path (what nf4.quantize/nf4.dequantize run) equals it bit for
bit, it equals bitsandbytes, and double quantization handles the extreme magnitudes bitsandbytes handles."""
import importlib

import pytest
import torch
from reference_libs import reference

import nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(48, 256), (5, 33), (7,), (1,), (3, 96), (129, 65), (2, 4096)]


def assert_same_weight(a, b):
    assert a.tensors().keys() == b.tensors().keys()
    for name, tensor in a.tensors().items():
        assert tensor.dtype == b.tensors()[name].dtype and torch.equal(tensor, b.tensors()[name]), name
    assert (a.shape, a.dtype, a.block_size) == (b.shape, b.dtype, b.block_size)


@pytest.mark.parametrize("rounding", ["cpu", "cuda"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 64, 4096])
def test_fast_path_equals_reference(shape, dtype, block_size, rounding):
    """Under either rounding rule (``nf4/rounding.py``) the fast path gives the reference's bytes and values."""
    torch.manual_seed(sum(shape) + block_size)
    w = (torch.randn(shape) * 3).to(dtype)
    for double_quant in (False, True):
        fast = nf4.quantize(w, block_size, double_quant, rounding=rounding)
        plain = nf4.quantize_reference(w, block_size, double_quant, rounding=rounding)
        assert_same_weight(fast, plain)
        for out_dtype in DTYPES:
            expected = nf4.dequantize_reference(plain, out_dtype)
            assert torch.equal(nf4.dequantize(fast, out_dtype), expected)
            out = torch.full(shape, float("nan"), dtype=out_dtype)
            assert nf4.dequantize(fast, out_dtype, out=out) is not None and torch.equal(out, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_paths_equal_reference(threads):
    """Several workers over contiguous block ranges (and the serial path) give the reference's bytes and values."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(threads)
        w = torch.randn(300, 1000) * 2  # 300000 values: above the threaded path's threshold
        qw = nf4.quantize(w)
        assert_same_weight(qw, nf4.quantize_reference(w))
        for dtype in DTYPES:
            assert torch.equal(nf4.dequantize(qw, dtype), nf4.dequantize_reference(qw, dtype))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("double_quant", [False, True])
def test_reference_equals_bitsandbytes(double_quant):
    bnb = reference("bitsandbytes")
    torch.manual_seed(3)
    w = torch.randn(64, 320).to(torch.bfloat16)
    qw = nf4.quantize_reference(w, 64, double_quant)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(qw.packed, packed.reshape(-1)) and torch.equal(qw.absmax, state.absmax)
    assert torch.equal(nf4.dequantize_reference(qw), bnb.functional.dequantize_4bit(packed, state).reshape(w.shape))


EXTREMES = {
    "subnormal": lambda: torch.randn(64 * 6) * 1e-41,
    "subnormal and tiny normal": lambda: torch.cat([torch.randn(64) * 1e-41, torch.randn(64) * 1e-39]),
    "all-zero blocks": lambda: torch.cat([torch.zeros(64 * 300), torch.randn(64 * 3)]),
    "one block near fp32 max": lambda: torch.cat([torch.full((64,), 3.3e38), torch.randn(64 * 3)]),
    "fp16 maximum": lambda: torch.full((128,), 65504.0).half(),
    "tiny normal": lambda: torch.randn(64 * 4) * 1e-37,
}


@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_double_quant_of_extreme_magnitudes_matches_bitsandbytes(name):
    """Finite inputs bitsandbytes handles: same bytes and same dequantized values, from both paths."""
    bnb = reference("bitsandbytes")
    torch.manual_seed(0)
    w = EXTREMES[name]()
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    expected = bnb.functional.dequantize_4bit(packed, state).reshape(w.shape)  # bitsandbytes: 1-D -> [1, n]
    assert torch.isfinite(expected).all()
    for qw in (nf4.quantize(w), nf4.quantize_reference(w)):
        assert torch.equal(qw.packed, packed.reshape(-1)) and torch.equal(qw.absmax, state.absmax)
        assert torch.equal(qw.nested_absmax, state.state2.absmax) and torch.equal(qw.offset, state.offset)
        assert torch.equal(qw.dequantize(), expected)


def test_where_bitsandbytes_gives_nan_we_raise():
    """Absmax values near the fp32 maximum: their mean overflows; bitsandbytes dequantizes to NaN."""
    bnb = reference("bitsandbytes")
    w = torch.full((64 * 4,), 3.3e38)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.isnan(bnb.functional.dequantize_4bit(packed, state)).any()
    for quantize in (nf4.quantize, nf4.quantize_reference):
        with pytest.raises(ValueError, match="double quantization overflows.*double_quant=False"):
            quantize(w)
    assert torch.equal(nf4.quantize(w, double_quant=False).dequantize(), nf4.quantize_reference(w, 64, False).dequantize())


def test_one_host_sync_per_tensor(monkeypatch):
    """quantize reads one value back from the device per tensor (the finiteness check), however many chunks."""
    fast_path = importlib.import_module("nf4.fast_path")
    monkeypatch.setattr(fast_path, "chunk_values", lambda device: 4096)  # many chunks
    calls = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or original(self))
    nf4.quantize(torch.randn(64, 1000))
    assert len(calls) == 1


def test_chunks_are_device_sized():
    fast_path = importlib.import_module("nf4.fast_path")
    assert fast_path.chunk_values(torch.device("cuda")) >= 32 * fast_path.chunk_values(torch.device("cpu"))
