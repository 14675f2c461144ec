"""nf4/triton_dequant.py: the fused kernel, run under the Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton compiles anything, so the checks run in a fresh
subprocess (this same file run as a script) with the variable set; the rest of the test session
is unaffected. Small shapes: the interpreter executes the kernel in numpy.
"""
import os
import subprocess
import sys

import pytest
from reference_libs import reference


def run_checks() -> int:
    """Triton == reference == bitsandbytes, bit for bit (also with out=). Returns the number of cases checked."""
    import torch

    import nf4

    bnb = None
    try:
        import bitsandbytes as bnb
    except ImportError:
        pass
    cases = 0
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # several blocks per tile row set, a partial block and odd count, several tile rows per block, tiny
        for shape, block_size in [((48, 128), 64), ((7, 33), 32), ((2, 1024), 1024), ((3,), 64)]:
            w = (torch.randn(shape) * 3).to(dtype)
            for double_quant in (False, True):
                qw = nf4.quantize(w, block_size=block_size, double_quant=double_quant)
                for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                    triton_out = nf4.dequantize(qw, out_dtype, backend="triton")
                    assert torch.equal(triton_out, nf4.dequantize_reference(qw, out_dtype)), (shape, out_dtype)
                    into = torch.full(shape, float("nan"), dtype=out_dtype)
                    nf4.dequantize(qw, out_dtype, backend="triton", out=into)
                    assert torch.equal(into, triton_out), ("out=", shape, out_dtype)
                    if bnb is not None and shape[-1] % block_size in (0, 1):  # where bnb's CPU kernel is right
                        packed, state = bnb.functional.quantize_4bit(
                            w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)
                        state.dtype = out_dtype
                        assert torch.equal(triton_out, bnb.functional.dequantize_4bit(packed, state).reshape(shape))
                    cases += 1
    return cases


def test_gpu_launch_configuration_is_well_formed():
    """The CUDA branch cannot run here; its autotuned kernel and grid are at least built and consistent."""
    module = pytest.importorskip("nf4.triton_dequant")
    configs = module._autotuned_kernel.configs
    assert configs and all(c.kwargs["ROWS"] & (c.kwargs["ROWS"] - 1) == 0 for c in configs)
    assert module._autotuned_kernel.fn is module._nf4_dequant_kernel
    for block_size in (32, 64, 4096):  # COLS divides the bytes of one quantization block
        assert (block_size // 2) % min(block_size // 2, module.MAX_COLS) == 0


@pytest.mark.slow
def test_triton_kernel_under_interpreter_is_bit_identical():
    reference("bitsandbytes")  # the subprocess compares with it too: fail/skip here if it is missing
    reference("triton")  # a hard dependency on Linux: missing under HOME70B_REQUIRE_COMPARE=1 fails
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-identical in 72 cases" in result.stdout, result.stdout


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(f"triton == torch == bitsandbytes: bit-identical in {run_checks()} cases")
