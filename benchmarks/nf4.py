"""NF4, ours vs bitsandbytes, measured side by side in one run; prints one table.

    python -m benchmarks.nf4                   # CPU: our PyTorch fast path vs bitsandbytes' CPU backend
    python -m benchmarks.nf4 --threads 1       # (and --threads 2): torch's intra-op threads for both sides
    python -m benchmarks.nf4 --quick           # tiny sizes, seconds (what the test runs)
    python -m benchmarks.nf4 --device cuda     # GPU: our Triton kernel vs bitsandbytes' CUDA kernels

Rows: quantize time of one 4096 x 14336 bf16 weight (an MLP projection of Llama-3-8B); dequantize
time of that weight and of a 2048 x 4096 one (the size notebook 02 measures); medians of interleaved
repeats (ours, then bitsandbytes, in turn, so background load hits both alike). Dequantize is timed two
ways for us: into a reused ``out=`` workspace (how ``nf4.Linear4bit`` calls it on CPU) and allocating the
output each call (as bitsandbytes' CPU backend always does: it has no ``out=``). On CPU each call's CPU
time (all threads) and minor page faults are printed too: they say why the ratio depends on the size.
A fresh output above glibc's largest mmap threshold (32 MiB) is mapped anew by every call and every
4 KiB page of it faults on first write (28,673 faults for 117 MB); a smaller one is recycled from the heap
after the first call and faults no more. The memory floor is the bytes the operation must move (read the
NF4 storage, write the dense weight) divided by this machine's copy bandwidth (measured here: read + write
of a 128 MiB buffer); "x floor" says how far above it each side is (below 1 is possible for a weight
that stays in the last-level cache between calls). Then: identical bytes per stored tensor (the NF4
codes and the double-quantized absmax: its 8-bit codes, nested absmax, offset) and identical dequantized
values, ours quantized with the rounding rule of the device's bitsandbytes kernel (``nf4/rounding.py``:
"cpu" against its CPU backend, "cuda" against its CUDA kernel), and how many bytes the other rule would
change;
mean squared error on N(0, 1) data for NF4, bitsandbytes' FP4 and the Int4 absmax baseline; storage
bits per parameter with double quantization (target 4 + 8/64 + 32/16384 = 4.127).
The CUDA branch is written but not yet run on a GPU.
"""
import resource
import statistics
import time

import torch

import nf4
from llama.cli import Parser, fail, integer, run_command
from nf4.int4_baseline import int4_absmax_roundtrip

from . import timed

try:
    import bitsandbytes as bnb
except ImportError:
    fail("benchmarks.nf4 compares with bitsandbytes: pip install -e '.[compare]'")

TARGET_BITS = 4 + 8 / 64 + 32 / (64 * 256)
DEQUANT_SHAPES = ((4096, 14336), (2048, 4096))  # an MLP projection of Llama-3-8B; notebook 02's size


def bnb_quantize(w, double_quant=True, quant_type="nf4"):
    return bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


def copy_bandwidth(device, nbytes, repeats) -> float:
    """Bytes/s of a plain device copy, counting read + write."""
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # touch the pages first
    return 2 * nbytes / statistics.median(timed(lambda: target.copy_(source), device) for _ in range(repeats))


def cpu_counters() -> tuple[float, int]:
    """(CPU seconds of this process, all threads; minor page faults so far)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def measured(fn, device) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, minor page faults) of one call of ``fn``."""
    cpu, faults = cpu_counters()
    wall = timed(fn, device)
    cpu_after, faults_after = cpu_counters()
    return wall, cpu_after - cpu, faults_after - faults


def interleaved_medians(fns: dict, device, repeats) -> dict:
    """Per fn, the medians of (wall s, CPU s, page faults), the fns called in turn ``repeats`` times (one
    warm-up round first)."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(measured(fn, device))
    return {name: tuple(statistics.median(column) for column in zip(*s)) for name, s in samples.items()}


def differing_bytes(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, int]:
    a, b = ours.contiguous().view(torch.uint8).reshape(-1), theirs.contiguous().view(torch.uint8).reshape(-1)
    if a.numel() != b.numel():
        return max(a.numel(), b.numel()), max(a.numel(), b.numel())
    return int((a != b).sum().item()), a.numel()


def identity_rows(w, ours_q, bnb_packed, bnb_state, rounding):
    """Per stored tensor: identical yes/no and how many bytes differ, ours under ``rounding`` vs the bitsandbytes
    kernel of w's device; then how many NF4 and 8-bit absmax bytes the other rule changes."""
    kernel = "CUDA kernel" if rounding == "cuda" else "CPU backend"
    rows = [(f"rounding rule vs bitsandbytes' {kernel}", rounding, kernel, None, "")]
    pairs = [("NF4 codes", ours_q.packed, bnb_packed),
             ("double-quant absmax (8-bit codes)", ours_q.absmax, bnb_state.absmax),
             ("nested absmax", ours_q.nested_absmax, bnb_state.state2.absmax),
             ("offset", ours_q.offset.reshape(1), bnb_state.offset.reshape(1))]
    for name, ours, theirs in pairs:
        diff, total = differing_bytes(ours, theirs)
        rows.append((f"identical bytes: {name}", "yes" if diff == 0 else "no", f"{diff} of {total} differ", None, ""))
    same = torch.equal(ours_q.dequantize(), bnb.functional.dequantize_4bit(bnb_packed, bnb_state).reshape(w.shape))
    rows.append(("identical dequantized values", "yes" if same else "no", "", None, ""))
    other = "cpu" if rounding == "cuda" else "cuda"
    other_q = nf4.quantize(w, rounding=other)
    changed = [differing_bytes(other_q.packed, ours_q.packed)[0], differing_bytes(other_q.absmax, ours_q.absmax)[0]]
    rows.append((f"{other} rule instead: NF4; 8-bit absmax bytes changed", f"{changed[0]}; {changed[1]}", "-", None, ""))
    return rows


def quantize_rows(device, shape, repeats):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16, device=device)
    rounding = device.type  # "cpu" or "cuda": the rule of the bitsandbytes kernel we compare with
    med = interleaved_medians({"ours": lambda: nf4.quantize(w, rounding=rounding), "bnb": lambda: bnb_quantize(w)},
                              device, repeats)
    ours, theirs = med["ours"][0], med["bnb"][0]
    name = "x".join(map(str, shape))
    rows = [(f"quantize {name} bf16, ms", ours * 1e3, theirs * 1e3, theirs / ours, "x speed")]
    ours_q, (bnb_packed, bnb_state) = nf4.quantize(w, rounding=rounding), bnb_quantize(w)
    return rows + identity_rows(w, ours_q, bnb_packed, bnb_state, rounding), w


def dequantize_rows(device, shape, repeats, copy_bw):
    """Ours into out= and allocating vs bitsandbytes (which allocates), against the memory floor."""
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16, device=device)
    ours_q, (bnb_packed, bnb_state) = nf4.quantize(w, rounding=device.type), bnb_quantize(w)
    workspace = torch.empty(shape, dtype=torch.bfloat16, device=device)
    med = interleaved_medians({
        "out": lambda: nf4.dequantize(ours_q, out=workspace), "alloc": lambda: nf4.dequantize(ours_q),
        "bnb": lambda: bnb.functional.dequantize_4bit(bnb_packed, bnb_state),
    }, device, repeats)
    (out, out_cpu, out_faults), (alloc, alloc_cpu, alloc_faults), (theirs, bnb_cpu, bnb_faults) = (
        med["out"], med["alloc"], med["bnb"])
    moved = ours_q.nbytes + w.numel() * w.element_size()  # read the NF4 storage, write bf16
    floor = moved / copy_bw
    path = "Triton kernel" if device.type == "cuda" else "PyTorch fast path"
    name = "x".join(map(str, shape))
    rows = [
        (f"dequantize {name} ({path}) into out=, ms", out * 1e3, theirs * 1e3, theirs / out, "x speed"),
        (f"dequantize {name}, allocating the output, ms", alloc * 1e3, theirs * 1e3, theirs / alloc, "x speed"),
    ]
    if device.type == "cpu":
        rows += [
            (f"  {name}: CPU ms per call, all threads (out=; alloc)", f"{out_cpu * 1e3:.2f}; {alloc_cpu * 1e3:.2f}",
             f"{bnb_cpu * 1e3:.2f}", None, ""),
            (f"  {name}: page faults per call (out=; alloc)", f"{out_faults:.0f}; {alloc_faults:.0f}",
             f"{bnb_faults:.0f}", None, ""),
        ]
    return rows + [
        (f"  {name}: memory floor {moved / 1e6:.0f} MB at copy {copy_bw / 1e9:.1f} GB/s, ms", floor * 1e3,
         floor * 1e3, None, ""),
        (f"  {name}: time / memory floor (out=; alloc)", f"{out / floor:.2f}; {alloc / floor:.2f}",
         f"{theirs / floor:.2f}", None, "x floor"),
    ]


def accuracy_rows(device, numel):
    torch.manual_seed(1)
    x = torch.randn(numel, device=device)
    mse = lambda y: (y.reshape(-1) - x).pow(2).mean().item()  # noqa: E731
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


def main(argv=None):
    parser = Parser(prog="python -m benchmarks.nf4", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=integer(minimum=1), default=5)
    parser.add_argument("--threads", type=integer(minimum=1), default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the table, not the speed")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but no CUDA GPU is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = (((256, 1024), (128, 512)), 1, 1 << 16)
    shapes, repeats, numel = quick if args.quick else (DEQUANT_SHAPES, args.repeats, 1 << 22)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"nf4 vs bitsandbytes {bnb.__version__} on {where}; torch {torch.__version__}; block 64, double quant")
    start = time.perf_counter()
    rows, w = quantize_rows(device, shapes[0], repeats)
    copy_bw = copy_bandwidth(device, 1 << (30 if device.type == "cuda" else 27), max(3, repeats))
    for shape in shapes:
        rows += dequantize_rows(device, shape, repeats, copy_bw)
    rows += accuracy_rows(device, numel) + bits_rows(w)
    print(f"| {'measurement':<60} | {'ours':>14} | {'bitsandbytes':>18} | {'ratio':>14} |")
    print(f"|{'-' * 62}|{'-' * 16}|{'-' * 20}|{'-' * 16}|")
    for name, ours, theirs, ratio, unit in rows:
        ratio_text = f"{ratio:.3f} {unit}" if ratio is not None else unit
        print(f"| {name:<60} | {fmt(ours):>14} | {fmt(theirs):>18} | {ratio_text:>14} |")
    print(f"('x speed' = bitsandbytes time / our time: > 1 means ours is faster.) {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_command(main)
