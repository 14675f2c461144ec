"""Property test: nf4.quantize/dequantize against bitsandbytes on random shapes, block sizes, dtypes and value
ranges from subnormal to near the largest finite value of the dtype (bytes and values identical)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from reference_libs import reference

import nf4

# (dtype, smallest and largest decimal exponent of the scale): past the top, 4 blocks' mean would overflow
EXPONENTS = {torch.float32: (-44, 37), torch.bfloat16: (-39, 37), torch.float16: (-6, 4)}


@st.composite
def weights(draw):
    dtype = draw(st.sampled_from(sorted(EXPONENTS, key=str)))
    block_size = draw(st.sampled_from(nf4.SUPPORTED_BLOCK_SIZES))
    low, high = EXPONENTS[dtype]
    scale = 10.0 ** draw(st.floats(low, high))
    # rows of whole blocks (every real weight), or a 1-D odd count (partial block, padding): bitsandbytes'
    # CPU dequantize is only right on those (an even last dimension not a multiple of the block is not)
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3)), block_size * draw(st.integers(1, 2)))
    else:
        shape = (2 * draw(st.integers(0, 300)) + 1,)
    seed = draw(st.integers(0, 2**16))
    zero_block = draw(st.booleans())
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    if zero_block:
        w.view(-1)[: min(block_size, w.numel())] = 0
    return w.to(dtype), block_size


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=weights(), double_quant=st.booleans())
def test_quantize_and_dequantize_equal_bitsandbytes(case, double_quant):
    bnb = reference("bitsandbytes")
    w, block_size = case
    packed, state = bnb.functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4",
                                                 compress_statistics=double_quant)
    qw = nf4.quantize(w, block_size=block_size, double_quant=double_quant)
    assert torch.equal(qw.packed, packed.reshape(-1)), "packed bytes differ"
    assert torch.equal(qw.absmax, state.absmax), "absmax differs"
    if double_quant:
        assert torch.equal(qw.nested_absmax, state.state2.absmax) and torch.equal(qw.offset, state.offset)
    expected = bnb.functional.dequantize_4bit(packed, state).reshape(w.shape)
    assert torch.equal(qw.dequantize(), expected), "dequantized values differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_just_below_the_overflow_still_matches(dtype):
    """Absmax values of ~1e38 whose mean is still finite: bytes and values as bitsandbytes."""
    bnb = reference("bitsandbytes")
    w = torch.cat([torch.full((64,), 1e38), torch.randn(64 * 7)]).to(dtype)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qw = nf4.quantize(w)
    assert torch.equal(qw.absmax, state.absmax) and torch.equal(qw.offset, state.offset)
    assert torch.equal(qw.dequantize(), bnb.functional.dequantize_4bit(packed, state).reshape(w.shape))
