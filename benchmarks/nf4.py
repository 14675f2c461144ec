"""NF4, ours vs bitsandbytes, measured side by side in one run; prints one table.

    python -m benchmarks.nf4                   # CPU: PyTorch path vs bitsandbytes' CPU backend
    python -m benchmarks.nf4 --device cuda     # GPU: our Triton kernel vs bitsandbytes' CUDA kernels,
                                               # and both against a plain device copy (benchmarks/gpu.sh)

Rows: quantize and dequantize time of one 4096 x 14336 bf16 weight (an MLP projection of Llama-3-8B),
median of a few interleaved repeats; whether both give identical bytes and values; mean squared
error on N(0, 1) data for NF4, bitsandbytes' FP4 and a plain 4-bit absmax integer code (levels
-7..7); storage bits per parameter with double quantization (target 4 + 8/64 + 32/16384 = 4.127).
"""
import argparse
import statistics
import time

import torch

import nf4

from . import timed

try:
    import bitsandbytes as bnb
except ImportError:
    raise SystemExit("benchmarks/nf4.py compares with bitsandbytes: pip install -e '.[compare]'")

SHAPE = (4096, 14336)
TARGET_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def median_time(fn, device, repeats):
    return statistics.median(timed(fn, device) for _ in range(repeats))


def bnb_quantize(w, double_quant=True, quant_type="nf4"):
    return bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


def int4_absmax_roundtrip(w, block_size=64):
    """The naive 4-bit code: per block, x / absmax * 7 rounded to an integer in -7..7."""
    blocks = w.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    return ((blocks / absmax * 7).round() * absmax / 7).view_as(w)


def timing_rows(device, repeats):
    torch.manual_seed(0)
    w = torch.randn(SHAPE, dtype=torch.bfloat16, device=device)
    ours_q, (bnb_packed, bnb_state) = nf4.quantize(w), bnb_quantize(w)  # warm-up, and the equality check
    same_bytes = torch.equal(ours_q.packed, bnb_packed.view(-1)) and torch.equal(ours_q.absmax, bnb_state.absmax)
    same_values = torch.equal(ours_q.dequantize(), bnb.functional.dequantize_4bit(bnb_packed, bnb_state))
    t = {"ours_q": [], "bnb_q": [], "ours_d": [], "bnb_d": []}
    for _ in range(repeats):  # interleaved, so background load hits both sides alike
        t["ours_q"].append(median_time(lambda: nf4.quantize(w), device, 1))
        t["bnb_q"].append(median_time(lambda: bnb_quantize(w), device, 1))
        t["ours_d"].append(median_time(lambda: ours_q.dequantize(), device, 3))
        t["bnb_d"].append(median_time(lambda: bnb.functional.dequantize_4bit(bnb_packed, bnb_state), device, 3))
    med = {k: statistics.median(v) for k, v in t.items()}
    path = "Triton kernel" if device.type == "cuda" else "PyTorch path"
    rows = [
        ("quantize 4096x14336 bf16, ms", med["ours_q"] * 1e3, med["bnb_q"] * 1e3, med["bnb_q"] / med["ours_q"], "x speed"),
        (f"dequantize ({path}), ms", med["ours_d"] * 1e3, med["bnb_d"] * 1e3, med["bnb_d"] / med["ours_d"], "x speed"),
        ("identical bytes / identical values", f"{same_bytes} / {same_values}", "", None, ""),
    ]
    if device.type == "cuda":
        moved = ours_q.nbytes + w.numel() * w.element_size()  # read the NF4 storage, write bf16
        ours_bw, bnb_bw = moved / med["ours_d"] / 1e9, moved / med["bnb_d"] / 1e9
        source = torch.empty(1 << 30, dtype=torch.uint8, device=device)  # reference: a plain 1 GiB copy
        target = torch.empty_like(source)
        copy_bw = 2 * source.numel() / median_time(lambda: target.copy_(source), device, 10) / 1e9  # read + write
        rows += [
            ("dequantize bandwidth, GB/s", ours_bw, bnb_bw, ours_bw / bnb_bw, "x"),
            ("device copy bandwidth (reference), GB/s", copy_bw, copy_bw, None, ""),
            ("dequantize bandwidth / copy bandwidth", ours_bw / copy_bw, bnb_bw / copy_bw, None, ""),
        ]
    return rows, w


def accuracy_rows(device):
    torch.manual_seed(1)
    x = torch.randn(4 * 1024 * 1024, device=device)
    mse = lambda y: (y - x).pow(2).mean().item()  # noqa: E731
    ours = mse(nf4.quantize(x).dequantize())
    bnb_nf4 = mse(bnb.functional.dequantize_4bit(*bnb_quantize(x)))
    bnb_fp4 = mse(bnb.functional.dequantize_4bit(*bnb_quantize(x, quant_type="fp4")))
    int4 = mse(int4_absmax_roundtrip(x))
    return [
        ("MSE on N(0,1), NF4", ours, bnb_nf4, ours / bnb_nf4, "x"),
        ("MSE on N(0,1), FP4 (bitsandbytes)", "-", bnb_fp4, bnb_fp4 / ours, "x NF4's"),
        ("MSE on N(0,1), Int4 absmax (-7..7)", int4, "-", int4 / ours, "x NF4's"),
    ]


def bits_rows(w):
    qw = nf4.quantize(w)
    packed, state = bnb_quantize(w)
    bnb_bytes = sum(t.numel() * t.element_size() for t in (packed, state.absmax, state.state2.absmax, state.offset))
    ours, theirs = 8 * qw.nbytes / w.numel(), 8 * bnb_bytes / w.numel()
    return [
        ("bits / parameter (double quant)", ours, theirs, ours / theirs, "x"),
        (f"  vs target {TARGET_BITS:.4f}", f"{100 * (ours / TARGET_BITS - 1):+.3f}%", f"{100 * (theirs / TARGET_BITS - 1):+.3f}%", None, ""),
    ]


def fmt(v):
    if isinstance(v, str):
        return v
    return f"{v:.4g}" if abs(v) < 1 else (f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"nf4 vs bitsandbytes {bnb.__version__} on {where}; torch {torch.__version__}; block 64, double quant")
    start = time.perf_counter()
    rows, w = timing_rows(device, args.repeats)
    rows += accuracy_rows(device) + bits_rows(w)
    print(f"| {'measurement':<40} | {'ours':>14} | {'bitsandbytes':>14} | {'ratio':>16} |")
    print(f"|{'-' * 42}|{'-' * 16}|{'-' * 16}|{'-' * 18}|")
    for name, ours, theirs, ratio, unit in rows:
        ratio_text = f"{ratio:.3f} {unit}" if ratio is not None else unit
        print(f"| {name:<40} | {fmt(ours):>14} | {fmt(theirs):>14} | {ratio_text:>16} |")
    print(f"('x speed' = bitsandbytes time / our time: > 1 means ours is faster.) {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
