"""nf4/quantize.py + nf4/double_quant.py: bit-exact with bitsandbytes' quantize_4bit on CPU, and its rules."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from reference_libs import reference

import nf4
from nf4.double_quant import quantize_absmax
from nf4.reference import NF4_MIDPOINTS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bnb_quantize(w, block_size, double_quant):
    bnb = reference("bitsandbytes")
    return bnb.functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)


def assert_same_as_bnb(w, block_size=64, double_quant=True):
    qw = nf4.quantize(w, block_size=block_size, double_quant=double_quant)
    packed, state = bnb_quantize(w, block_size, double_quant)
    assert torch.equal(qw.packed, packed.reshape(-1)), "packed bytes differ"
    assert qw.absmax.dtype == state.absmax.dtype and torch.equal(qw.absmax, state.absmax), "absmax differs"
    if double_quant:
        assert torch.equal(qw.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(qw.offset, state.offset), "offset differs"
    assert qw.shape == w.shape and qw.dtype == w.dtype and qw.block_size == block_size
    return qw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (3, 5), (1,), (7,), (1000,), (2, 3, 4, 5), (130, 33)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_with_bitsandbytes(dtype, shape, double_quant):
    torch.manual_seed(sum(shape))
    assert_same_as_bnb((torch.randn(shape) * 2.5).to(dtype), 64, double_quant)


@pytest.mark.parametrize("block_size", nf4.SUPPORTED_BLOCK_SIZES)
def test_every_block_size_bit_exact(block_size):
    torch.manual_seed(block_size)
    assert_same_as_bnb(torch.randn(3 * block_size + 17).to(torch.bfloat16), block_size, True)


def test_many_blocks_double_quant_bit_exact():
    """More than 256 blocks, so several nested blocks and a partial one; weights with outliers."""
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.rand(300, 1) * 4
    w[5, 7] = 40.0
    assert_same_as_bnb(w, 64, True)


def test_zero_blocks_and_constant_absmax():
    """All-zero blocks (absmax 0), an all-zero partial last block (stored as 1e-38), and a weight whose
    absmax values are all equal (every nested block is all zero after subtracting the mean)."""
    w = torch.randn(64 * 5 + 10)
    w[64:128] = 0
    w[-10:] = 0
    qw = assert_same_as_bnb(w, 64, True)
    assert qw.dequantize()[-10:].eq(0).all()
    constant = torch.ones(64 * 300)
    assert_same_as_bnb(constant, 64, True)
    assert torch.equal(nf4.quantize(constant).dequantize(), constant)


def test_value_on_a_midpoint_takes_the_lower_code():
    """absmax = 1 makes x = w exactly; each midpoint must land on the lower of its two codes."""
    w = torch.cat([torch.tensor([1.0]), NF4_MIDPOINTS, torch.zeros(64 - 16)])
    qw = assert_same_as_bnb(w, 64, False)
    codes = torch.stack([qw.packed >> 4, qw.packed & 0xF], dim=1).reshape(-1)[: w.numel()]
    assert codes[0] == 15 and torch.equal(codes[1:16].long(), torch.arange(15))


def test_first_element_in_high_nibble():
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # codes 0 and 15
    assert nf4.quantize(w, double_quant=False).packed[0].item() == 0x0F
    w[0], w[1] = 1.0, -1.0
    assert nf4.quantize(w, double_quant=False).packed[0].item() == 0xF0


def test_double_quant_absmax_matches_bnb_blockwise_8bit():
    """Our replica of bitsandbytes' 65536-point table lookup equals its 8-bit blockwise quantizer,
    including values within a hair of a midpoint of the dynamic map."""
    bnb = reference("bitsandbytes")
    torch.manual_seed(1)
    code = nf4.dynamic_code()
    near_midpoints = (code[:-1] + code[1:]) / 2 + torch.randn(255) * 1e-5
    naive_differs = 0
    for absmax in [torch.rand(5000) * 3, torch.cat([near_midpoints.abs(), torch.rand(300)]), torch.rand(256)]:
        codes, nested, offset = quantize_absmax(absmax)
        ref_codes, ref_state = bnb.functional.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
        assert torch.equal(codes, ref_codes) and torch.equal(nested, ref_state.absmax)
        assert torch.equal(offset, absmax.mean())
        centred = torch.nn.functional.pad(absmax - offset, (0, -absmax.numel() % 256)).view(-1, 256)
        nearest = torch.bucketize(centred / nested[:, None], (code[:-1] + code[1:]) / 2).view(-1)[: absmax.numel()]
        naive_differs += (nearest != codes.long()).sum().item()
    assert naive_differs > 0, "a plain nearest-code search should differ somewhere (else this test proves little)"


def test_storage_bits_per_parameter():
    """4 + 8/64 + 32/(64*256) = 4.127 bits per parameter with double quantization; 4.5 without."""
    w = torch.randn(256, 4096)
    bits = 8 * nf4.quantize(w).nbytes / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / 16384)) < 1e-3
    assert abs(8 * nf4.quantize(w, double_quant=False).nbytes / w.numel() - 4.5) < 1e-6


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (torch.tensor([1.0, float("nan")]), ValueError, "NaN"),
        (torch.tensor([1.0, float("inf")]), ValueError, "Inf"),
        (torch.empty(0, 4), ValueError, "empty"),
        (torch.arange(64), TypeError, "float32"),
        (torch.ones(4, dtype=torch.float64), TypeError, "float32"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
    ],
)
def test_bad_weight(bad, error, words):
    with pytest.raises(error, match=words):
        nf4.quantize(bad)


@pytest.mark.parametrize("block_size, error", [(48, ValueError), (16, ValueError), (8192, ValueError), (0, ValueError),
                                               (64.0, TypeError)])
def test_bad_block_size(block_size, error):
    with pytest.raises(error, match="block_size"):
        nf4.quantize(torch.randn(128), block_size=block_size)


shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), block_size=st.sampled_from([32, 64, 128, 256]),
       double_quant=st.booleans(), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_property_bytes_and_absmax_equal_bnb(shape, dtype, block_size, double_quant, seed, scale):
    torch.manual_seed(seed)
    assert_same_as_bnb((torch.randn(shape) * scale).to(dtype), block_size, double_quant)


LARGEST_GAP = (nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max().item()


@settings(max_examples=25, deadline=None)
@given(shape=shapes, block_size=st.sampled_from([32, 64, 256]), double_quant=st.booleans(),
       seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_property_error_within_half_the_largest_gap(shape, block_size, double_quant, seed, scale):
    """|w - dequantize(quantize(w))| <= absmax/2 * largest code gap (+ the absmax's own error with double quant)."""
    torch.manual_seed(seed)
    w = torch.randn(shape) * scale
    qw = nf4.quantize(w, block_size=block_size, double_quant=double_quant)
    flat = w.reshape(-1)
    n_blocks = -(-flat.numel() // block_size)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel()))
    absmax = padded.view(n_blocks, block_size).abs().amax(1).repeat_interleave(block_size)[: flat.numel()]
    bound = absmax / 2 * LARGEST_GAP + 1e-6 * absmax
    if double_quant:
        from nf4.dequantize import block_absmax
        bound += (block_absmax(qw) - absmax[::block_size]).abs().repeat_interleave(block_size)[: flat.numel()]
    error = (qw.dequantize(torch.float32).reshape(-1) - flat).abs()
    assert torch.all(error <= bound)


def test_cell_search_equals_binary_search():
    """The fast cell lookup used for whole blocks gives bucketize's codes, also right at and beside the
    midpoints (one float step either side) and at the cell edges."""
    from nf4.reference import nearest_code

    mid = NF4_MIDPOINTS
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    edges = torch.arange(-32, 33) / 32
    values = torch.cat([mid, up, down, edges, torch.nextafter(edges, torch.tensor(2.0)), torch.rand(100_000) * 2 - 1])
    values = torch.nn.functional.pad(values.clamp(-1, 1), (0, -values.numel() % 4095)).view(-1, 4095)
    values = torch.cat([torch.ones(values.shape[0], 1), values], dim=1).view(-1)  # absmax 1: x is w itself
    qw = nf4.quantize(values, block_size=4096, double_quant=False)
    codes = torch.stack([qw.packed >> 4, qw.packed & 0xF], dim=1).reshape(-1)
    assert torch.equal(codes.long(), nearest_code(values))
