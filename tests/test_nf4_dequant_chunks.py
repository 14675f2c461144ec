"""The fast dequantize path cut every way it can be cut equals the plain definition bit for bit: one chunk or
many (the last one short), odd block counts, a partial last block, a partial last block of 256 absmax
values (double quantization), every output dtype, into ``out=`` or allocating."""
import importlib

import pytest
import torch

import nf4
from nf4.codebook import dynamic_code
from nf4.reference import block_absmax

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, block size): odd block counts, a partial last block, more than 256 blocks (a partial nested block)
CASES = [((3, 64), 64), ((37, 64), 32), ((515, 64), 64), ((1001, 33), 64), ((5, 4096), 4096), ((9, 1000), 128)]


@pytest.mark.parametrize("chunk", [None, 4096])  # None: one chunk; 4096 values: many chunks, the last one short
@pytest.mark.parametrize("shape, block_size", CASES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_reference_in_any_chunking(monkeypatch, chunk, shape, block_size, double_quant):
    if chunk is not None:
        monkeypatch.setattr(importlib.import_module("nf4.fast_path"), "chunk_values", lambda device: chunk)
    torch.manual_seed(shape[0] + block_size)
    qw = nf4.quantize(torch.randn(shape) * 2, block_size, double_quant)
    for dtype in DTYPES:
        expected = nf4.dequantize_reference(qw, dtype)
        assert torch.equal(nf4.dequantize(qw, dtype), expected), dtype
        out = torch.full(shape, float("nan"), dtype=dtype)
        nf4.dequantize(qw, dtype, out=out)
        assert torch.equal(out, expected), dtype


@pytest.mark.parametrize("n_blocks", [1, 255, 256, 257, 700])
def test_double_quantized_absmax_is_code_times_nested_absmax_plus_offset(n_blocks):
    """absmax[i] = dynamic_code[code[i]] * nested_absmax[i // 256] + offset, in fp32, rounded after each step."""
    torch.manual_seed(n_blocks)
    qw = nf4.quantize(torch.randn(n_blocks, 64) * torch.rand(n_blocks, 1) * 5, 64, double_quant=True)
    nested = qw.nested_absmax[torch.arange(n_blocks) // 256]
    expected = dynamic_code()[qw.absmax.long()] * nested + qw.offset
    assert torch.equal(block_absmax(qw), expected)
