"""nf4/rounding.py: the CPU rule (bitsandbytes' CPU backend) and the CUDA rule (its CUDA kernel), on the CPU.

The CUDA rule's fast path equals its plain reference bit for bit, including values on and one ulp around
every threshold, subnormals and zero blocks; the two rules differ only within an ulp or two of a threshold
(and for zero blocks); the 8-bit absmax search equals a scalar transcription of the kernel's search;
dequantization does not depend on the rule. Against bitsandbytes' CUDA kernel itself only a GPU can check
(``python -m benchmarks.nf4 --device cuda``).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_libs import reference
from test_nf4_reference import assert_same_weight

import nf4
from nf4.codebook import NF4_CUDA_THRESHOLDS, NF4_MIDPOINTS
from nf4.double_quant import quantize_absmax, search_dynamic_code
from nf4.reference import nearest_code, unpack
from nf4.rounding import SMALLEST_NORMAL, check_rounding, kernel_reciprocal

# The FSETP.GT immediates of kQuantizeBlockwise<bf16, 64, 2, 0, NF4> in bitsandbytes 0.50.2's
# libbitsandbytes_cuda130.so (sm_90 code, disassembled with cuobjdump), sorted.
KERNEL_THRESHOLD_BITS = [0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
                         0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF,
                         0x3F5C89D9]


def fp32_from_bits(bits):
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def ulp_neighbours(values: torch.Tensor) -> torch.Tensor:
    """Each fp32 value and the fp32 numbers one and two ulps on either side of it."""
    down1 = torch.nextafter(values, torch.full_like(values, -2.0))
    up1 = torch.nextafter(values, torch.full_like(values, 2.0))
    down2 = torch.nextafter(down1, torch.full_like(values, -2.0))
    up2 = torch.nextafter(up1, torch.full_like(values, 2.0))
    return torch.cat([down2, down1, values, up1, up2])


def codes_of(qw):
    return unpack(qw.packed, qw.numel)


def test_cuda_thresholds_are_the_kernels_constants():
    assert torch.equal(NF4_CUDA_THRESHOLDS.view(torch.int32), fp32_from_bits(KERNEL_THRESHOLD_BITS).view(torch.int32))
    differ = (NF4_CUDA_THRESHOLDS != NF4_MIDPOINTS).nonzero().view(-1).tolist()
    assert differ == [0, 8, 12, 14]
    ulps = NF4_CUDA_THRESHOLDS.view(torch.int32)[differ] - NF4_MIDPOINTS.view(torch.int32)[differ]
    assert ulps.abs().eq(1).all()  # one ulp each


def kernel_tree(x: float, lo: int = 0, hi: int = 16) -> int:
    """dQuantizeNF4 as the kernel nests it: test x > the threshold in the middle of the codes left, recurse."""
    if hi - lo == 1:
        return lo
    mid = (lo + hi) // 2
    return kernel_tree(x, mid, hi) if x > NF4_CUDA_THRESHOLDS[mid - 1].item() else kernel_tree(x, lo, mid)


def test_threshold_count_is_the_kernels_decision_tree():
    torch.manual_seed(0)
    xs = torch.cat([ulp_neighbours(NF4_CUDA_THRESHOLDS), ulp_neighbours(NF4_MIDPOINTS), torch.rand(500) * 2 - 1,
                    torch.tensor([-1.0, 1.0, 0.0, -0.0, float("nan"), 1.0000001])])
    counted = nearest_code(xs, NF4_CUDA_THRESHOLDS)
    assert counted.tolist() == [kernel_tree(x) for x in xs.tolist()]
    assert counted[-2] == 0  # NaN fails every test: code 0


def adversarial_weight(dtype=torch.float32) -> torch.Tensor:
    """Blocks of 64 whose absmax is 1 (x = w exactly) holding every threshold of both rules and its ulp
    neighbours; subnormal values next to normal ones; a block of subnormals only; zero blocks; a block
    whose absmax is above 2^126 (its reciprocal is subnormal); an odd tail of zeros and one tiny value."""
    probes = torch.cat([ulp_neighbours(NF4_CUDA_THRESHOLDS), ulp_neighbours(NF4_MIDPOINTS)])
    probes = F.pad(probes, (0, -probes.numel() % 63)).view(-1, 63)
    on_thresholds = torch.cat([torch.ones(probes.shape[0], 1), probes], dim=1).view(-1)
    tiny = torch.tensor(2.0**-127)  # subnormal
    mixed = torch.cat([torch.tensor([4 * SMALLEST_NORMAL]), torch.full((31,), tiny), torch.full((32,), -tiny)])
    subnormal_only = torch.full((64,), tiny) * torch.linspace(-1, 1, 64)
    huge = torch.cat([torch.tensor([2.0**127]), torch.randn(63) * 1e37])
    tail = torch.cat([torch.zeros(36), tiny.reshape(1)])
    return torch.cat([on_thresholds, mixed, subnormal_only, torch.zeros(128), huge, torch.randn(64), tail]).to(dtype)


@pytest.mark.parametrize("rounding", ["cpu", "cuda"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_fast_path_equals_reference_on_adversarial_values(rounding, double_quant):
    w = adversarial_weight()
    fast = nf4.quantize(w, 64, double_quant, rounding=rounding)
    assert_same_weight(fast, nf4.quantize_reference(w, 64, double_quant, rounding=rounding))
    assert torch.equal(nf4.dequantize(fast), nf4.dequantize_reference(fast))


@pytest.mark.parametrize("threads", [1, 2])
def test_cuda_rule_threaded_path_equals_reference(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(threads)
        w = torch.cat([torch.randn(300_000), adversarial_weight()]).to(torch.bfloat16)
        assert_same_weight(nf4.quantize(w, rounding="cuda"), nf4.quantize_reference(w, rounding="cuda"))
    finally:
        torch.set_num_threads(before)


def test_cuda_rule_edge_cases_follow_the_kernel():
    """Zero blocks: absmax 0 stored, code 0 (0 * inf = NaN), where the CPU rule gives code 7. Subnormal
    values read as 0. A reciprocal below 2^-126 is flushed: the block's codes are all 7."""
    w = adversarial_weight()
    start = w.numel() - 37 - 64 - 64 - 128 - 64 - 64  # the mixed block
    cuda = nf4.quantize(w, double_quant=False, rounding="cuda")
    cpu = nf4.quantize(w, double_quant=False, rounding="cpu")
    cuda_codes, cpu_codes = codes_of(cuda), codes_of(cpu)
    blocks = slice(start // 64, start // 64 + 5)
    assert cuda.absmax[blocks].tolist() == [4 * SMALLEST_NORMAL, 0.0, 0.0, 0.0, 2.0**127]
    mixed, subnormal_only, zeros, huge = (slice(start + 64 * i, start + 64 * (i + 1)) for i in (0, 1, 2, 4))
    assert cuda_codes[mixed][1:].eq(7).all() and cpu_codes[mixed][1:].ne(7).any()  # flushed vs scaled up
    assert cuda_codes[subnormal_only].eq(0).all() and cuda_codes[zeros].eq(0).all() and cpu_codes[zeros].eq(7).all()
    assert cuda_codes[huge].eq(7).all() and cpu_codes[huge][0] == 15
    # the odd tail (36 zeros and a subnormal, padded): absmax 0, every code 0 (pad included) vs CPU's 1e-38 and 7
    assert cuda.absmax[-1] == 0 and cuda.packed[-19:].eq(0).all()
    assert cpu.absmax[-1] == torch.tensor(1e-38) and cpu.packed[-19:-1].eq(0x77).all()
    assert torch.equal(nf4.dequantize(cuda)[zeros], torch.zeros(64)) and nf4.dequantize(cuda)[zeros].signbit().all()


def test_rules_differ_only_within_ulps_of_a_threshold():
    """A constructed value on a threshold the kernel writes one ulp above the fp32 midpoint: the CPU rule
    rounds up, the CUDA rule down. On ordinary data the rules almost always agree, and every disagreement
    is a value within two ulps of a threshold (the rules' x differ by at most an ulp: tail division)."""
    w = torch.zeros(64)
    w[0], w[1] = 1.0, NF4_CUDA_THRESHOLDS[8]  # absmax 1: x = w exactly
    assert codes_of(nf4.quantize(w, double_quant=False, rounding="cpu"))[1] == 9
    assert codes_of(nf4.quantize(w, double_quant=False, rounding="cuda"))[1] == 8

    torch.manual_seed(5)
    planted = torch.cat([torch.ones(2, 1), F.pad(ulp_neighbours(NF4_CUDA_THRESHOLDS), (0, 126 - 75)).view(2, 63)], 1)
    w = torch.cat([torch.randn(64 * 31_250), planted.view(-1), torch.randn(40)])  # a partial tail too
    cpu, cuda = codes_of(nf4.quantize(w, 64, False, "cpu")), codes_of(nf4.quantize(w, 64, False, "cuda"))
    differ = (cpu != cuda).nonzero().view(-1)
    assert 0 < differ.numel() <= 1e-5 * w.numel(), differ.numel()  # the planted threshold values differ
    blocks = F.pad(w, (0, -w.numel() % 64)).view(-1, 64)
    x = (blocks / blocks.abs().amax(dim=1, keepdim=True)).view(-1)[differ]
    distance_in_ulps = (x.view(torch.int32)[:, None] - NF4_MIDPOINTS.view(torch.int32)[None, :]).abs().min(dim=1)
    assert distance_in_ulps.values.max() <= 2, x


def test_rules_share_dequantize_and_the_storage_format():
    """A CUDA-rule weight is an ordinary QuantizedWeight: the same dequantize, and bitsandbytes reads it."""
    bnb = reference("bitsandbytes")
    torch.manual_seed(2)
    w = torch.cat([torch.randn(64 * 500), torch.zeros(64)]).to(torch.bfloat16)
    qw = nf4.quantize(w, rounding="cuda")
    assert torch.equal(nf4.dequantize(qw), nf4.dequantize_reference(qw))
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state.absmax, state.state2.absmax, state.offset = qw.absmax, qw.nested_absmax, qw.offset
    assert torch.equal(bnb.functional.dequantize_4bit(qw.packed.view(-1, 1), state).view(-1), nf4.dequantize(qw))


def kernel_search(x: np.float32, code: np.ndarray) -> int:
    """A scalar transcription of the kernel's 8-bit search (``dQuantize`` with STOCHASTIC = 0), fp32 arithmetic."""
    pivot, lower_pivot, upper_pivot = 127, 0, 255
    lower, upper, value = np.float32(-1), np.float32(1), code[127]
    for step in (64, 32, 16, 8, 4, 2, 1):
        if x > value:
            lower_pivot, lower, pivot = pivot, value, pivot + step
        else:
            upper_pivot, upper, pivot = pivot, value, pivot - step
        value = code[pivot]
    upper = code[255] if upper_pivot == 255 else upper
    lower = code[0] if lower_pivot == 0 else lower
    if x > value:
        return upper_pivot if x > (upper + value) * np.float32(0.5) else pivot
    return lower_pivot if x < (lower + value) * np.float32(0.5) else pivot


def test_dynamic_code_search_is_the_kernels_search():
    code = nf4.dynamic_code()
    midpoints = (code[:-1] + code[1:]) * 0.5
    torch.manual_seed(4)
    xs = torch.cat([ulp_neighbours(midpoints), ulp_neighbours(code), torch.rand(3000) * 2 - 1,
                    torch.tensor([float("nan"), 1.0000001, -1.0000001])])
    ours = search_dynamic_code(xs)
    code_np = code.numpy()
    assert ours.tolist() == [kernel_search(np.float32(x), code_np) for x in xs.tolist()]
    assert ours[-3] == 0  # NaN (a zero block): code 0
    ties = search_dynamic_code(midpoints).long() - torch.arange(255)
    assert ties.eq(0).any() and ties.eq(1).any()  # a tie goes to the lower code at some midpoints, the upper at others
    off_tie = torch.cat([torch.rand(3000) * 2 - 1, ulp_neighbours(midpoints)[: 2 * 255]])
    assert torch.equal(search_dynamic_code(off_tie).long(), torch.bucketize(off_tie, midpoints))  # else: nearest


def test_double_quant_rules_differ_near_midpoints_only():
    """The CPU grid picks a neighbour up to ~1.5e-5 from a midpoint; the CUDA search, only on exact ties."""
    code = nf4.dynamic_code()
    torch.manual_seed(6)
    absmax = torch.cat([torch.rand(20000) * 3, torch.tensor([3.0, 0.0])])
    cpu_codes, cpu_nested, cpu_offset = quantize_absmax(absmax, "cpu")
    cuda_codes, cuda_nested, cuda_offset = quantize_absmax(absmax, "cuda")
    assert torch.equal(cpu_nested, cuda_nested) and torch.equal(cpu_offset, cuda_offset)
    differ = (cpu_codes != cuda_codes).nonzero().view(-1)
    assert 0 < differ.numel() < 0.01 * absmax.numel()
    centred = F.pad(absmax - cuda_offset, (0, -absmax.numel() % 256)).view(-1, 256)
    x = (centred * (1.0 / cuda_nested)[:, None]).view(-1)[differ]
    assert ((x[:, None] - (code[:-1] + code[1:])[None, :] / 2).abs().min(dim=1).values < 2e-5).all()


def test_default_rule_is_the_devices():
    assert check_rounding(None, torch.device("cpu")) == "cpu"
    assert check_rounding(None, torch.device("cuda", 0)) == "cuda"
    w = torch.randn(64 * 40)
    assert_same_weight(nf4.quantize(w), nf4.quantize(w, rounding="cpu"))
    assert_same_weight(nf4.quantize_reference(w), nf4.quantize(w, rounding="cpu"))


def test_reciprocal_off_the_gpu_is_correctly_rounded_and_flushed():
    absmax = torch.tensor([1.0, 0.5, 0.0, 2.0**127, SMALLEST_NORMAL, 3.0])
    expected = torch.tensor([1.0, 2.0, float("inf"), 0.0, 2.0**126, 1 / 3])  # 2^-127 is subnormal: flushed
    assert torch.equal(kernel_reciprocal(absmax), expected)


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "", 1, True])
def test_unknown_rule_is_a_value_error_naming_the_argument(bad):
    w = torch.randn(64)
    for fn in (nf4.quantize, nf4.quantize_reference):
        with pytest.raises(ValueError, match=r"rounding must be one of \('cpu', 'cuda'\).*got " + repr(bad)):
            fn(w, rounding=bad)
