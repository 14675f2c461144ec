"""nf4/dequantize.py (PyTorch path): equal to bitsandbytes' dequantize_4bit and to the plain formula."""
import importlib

import pytest
import torch
from reference_libs import reference

import nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def plain_formula(qw, dtype):
    """w = NF4_CODE[code] * absmax[block] in fp32, then one rounding to dtype; written the obvious way."""
    from nf4.dequantize import block_absmax

    codes = torch.stack([qw.packed >> 4, qw.packed & 0xF], dim=1).reshape(-1)[: qw.numel].long()
    block = torch.arange(qw.numel) // qw.block_size
    return (nf4.NF4_CODE[codes] * block_absmax(qw)[block]).to(dtype).view(qw.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None] + DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, block_size", [((48, 256), 64), ((8, 4096), 4096), ((5, 33), 64), ((3, 32), 32)])
def test_equals_bitsandbytes(dtype, out_dtype, double_quant, shape, block_size):
    """Rows that are a multiple of the block size (every real weight) or odd: see the note below."""
    bnb = reference("bitsandbytes")
    torch.manual_seed(0)
    w = (torch.randn(shape) * 3).to(dtype)
    qw = nf4.quantize(w, block_size=block_size, double_quant=double_quant)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4",
                                                 compress_statistics=double_quant)
    state.dtype = out_dtype or dtype
    ours = qw.dequantize(out_dtype, backend="torch")
    assert ours.dtype == (out_dtype or dtype) and ours.shape == w.shape
    assert torch.equal(ours, bnb.functional.dequantize_4bit(packed, state).reshape(w.shape))


@pytest.mark.parametrize("shape", [(1,), (7,), (100,), (3, 96), (2, 5, 50), (129, 65)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_equals_plain_formula_any_shape(shape, double_quant):
    """Any shape, partial last block, odd counts. (bitsandbytes 0.50.2's CPU C kernel is not a valid
    reference here: for an even last dimension that is not a multiple of the block size, e.g. (3, 96)
    with blocks of 64, it scales by the wrong absmax; its own pure-PyTorch fallback agrees with us.)"""
    torch.manual_seed(len(shape))
    w = torch.randn(shape)
    qw = nf4.quantize(w, double_quant=double_quant)
    for dtype in DTYPES:
        assert torch.equal(qw.dequantize(dtype), plain_formula(qw, dtype))


def test_reconstruction_is_close_and_exact_on_codes():
    """Values that are levels times a block's absmax come back exactly."""
    absmax = torch.tensor([2.0, 0.5])
    w = torch.cat([nf4.NF4_CODE.repeat(4) * absmax[0], nf4.NF4_CODE.repeat(4) * absmax[1]])
    assert torch.equal(nf4.quantize(w, double_quant=False).dequantize(), w)


def test_bad_arguments():
    qw = nf4.quantize(torch.randn(64))
    with pytest.raises(ValueError, match="backend"):
        nf4.dequantize(qw, backend="cuda")
    with pytest.raises(TypeError, match="dtype"):
        nf4.dequantize(qw, dtype=torch.int8)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        nf4.dequantize(torch.randn(64))


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nf4.dequantize(nf4.quantize(torch.randn(64)), backend="triton")


def test_auto_uses_the_torch_path_on_cpu(monkeypatch):
    module = importlib.import_module("nf4.dequantize")  # the submodule (nf4.dequantize is the function)

    qw = nf4.quantize(torch.randn(64))
    calls = []
    monkeypatch.setattr(module, "dequantize_torch", lambda q, dtype, out: calls.append(dtype) or torch.zeros(64))
    nf4.dequantize(qw)
    assert calls == [torch.float32]


def test_triton_build_failure_falls_back_to_torch_with_one_warning(monkeypatch):
    """Simulates a host without a C compiler: Triton's launcher build raises on the first launch."""
    module = importlib.import_module("nf4.dequantize")
    monkeypatch.setattr(module, "_triton_state", {"built": False, "broken": None})

    def no_compiler(qw, dtype, out):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(module, "_triton", no_compiler)
    qw = nf4.quantize(torch.randn(8, 64))
    with pytest.warns(RuntimeWarning, match=r"could not be built \(RuntimeError: Failed to find C compiler"):
        first = module._triton_or_fallback(qw, torch.bfloat16, None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silent
        second = module._triton_or_fallback(qw, torch.bfloat16, None)
    expected = nf4.dequantize_reference(qw, torch.bfloat16)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_triton_errors_after_a_successful_build_are_not_swallowed(monkeypatch):
    module = importlib.import_module("nf4.dequantize")
    monkeypatch.setattr(module, "_triton_state", {"built": True, "broken": None})

    def launch_fails(qw, dtype, out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(module, "_triton", launch_fails)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        module._triton_or_fallback(nf4.quantize(torch.randn(64)), torch.float32, None)
