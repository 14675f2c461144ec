"""The fast PyTorch path of quantize and dequantize: the arithmetic of ``reference.py``, reorganised for speed.

Same bytes and values as the reference (tested bit for bit); only the order of work differs:

* **Chunks into reused buffers.** The weight is processed a chunk of blocks at a time into
  preallocated buffers, so no weight-sized fp32 temporary is allocated (and page-faulted). Chunks are
  cache-sized on CPU and large on a GPU (fewer launches).
* **Quantize, both rounding rules** (``rounding.py``): the CPU rule clamps absmax before its reciprocal;
  the CUDA rule flushes subnormal inputs to zero, takes the kernel's reciprocal of the unclamped absmax and
  its thresholds. Same chunks, same code search.
* **Quantize, nearest code by cells.** The 15 thresholds are at least 0.08 apart, so cutting [-2, 2) into
  cells of width 1/32 leaves at most one threshold per cell. A table gives, per cell, how many thresholds
  lie below the cell; one comparison with the next threshold finishes:
      code = below[cell(x)] + (x > threshold[below[cell(x)]])
  Rounding can put x into a neighbouring cell only when x is within ~1e-7 of a cell edge, and no
  threshold is that close to an edge (the nearest is 1.7e-3 away, asserted below), so the count is exact.
  A NaN x (the CUDA rule's zero block) becomes cell 0 (float -> int of NaN is INT_MIN on x86, 0 in PTX;
  the clamp maps both to 0) and fails the comparison: code 0, as the kernel.
* **Quantize, pack in one shift.** Viewed as int64, a pair of int32 codes (c0, c1) is c0 + (c1 << 32)
  (little endian), so ((v << 4) | (v >> 32)) holds (c0 << 4) | c1 in its low byte.
* **Quantize, one host sync.** Finiteness (NaN/Inf in the weight, overflow in double quantization) is
  checked once per tensor, at the end, by the caller; NaN cannot derail the chunks meanwhile (cell
  indices are clamped into the table).
* **Dequantize, one gather per byte.** A 256-entry table maps a byte to its PAIR of fp32 levels (8
  bytes, gathered as one int64), then one in-place multiply by the block's absmax and one converting
  copy into the output (rounding once, as the reference).
* **Threads without barriers (CPU, both directions).** With N torch threads, N workers each take a
  contiguous range of blocks and run its chunks with ops no larger than torch's parallel grain (32768
  values), so an op does not start an OpenMP team: the workers wait on each other once, at the end
  (torch ops release the GIL). Hundreds of parallel ops would each end in a barrier, and on a busy
  machine every barrier waits for a descheduled thread.
"""
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .codebook import NF4_CODE
from .quantized_weight import QuantizedWeight
from .reference import SMALLEST_ABSMAX
from .rounding import SMALLEST_NORMAL, kernel_reciprocal, thresholds

_CELLS_PER_UNIT = 32
_TORCH_GRAIN = 32768  # torch's at::internal::GRAIN_SIZE: smaller element-wise ops run on the calling thread


def chunk_values(device: torch.device) -> int:
    """Values per chunk: fp32 temporaries cache-sized on CPU; on a GPU few launches (~0.6 GB of temporaries)."""
    return 1 << 20 if device.type == "cpu" else 1 << 25


@functools.lru_cache(maxsize=None)
def _cell_tables(device: torch.device, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 thresholds-below per cell, fp32 thresholds + inf); cell c covers [c/32 - 2, (c+1)/32 - 2)."""
    edges = torch.arange(4 * _CELLS_PER_UNIT + 2, dtype=torch.float64) / _CELLS_PER_UNIT - 2
    bounds = thresholds(rounding, torch.device("cpu"))
    assert (bounds.double()[:, None] - edges[None, :]).abs().min() > 1e-4, "a threshold sits on a cell edge"
    assert torch.bincount(torch.bucketize(bounds.double(), edges, right=True)).max() <= 1, "two in one cell"
    below = torch.bucketize(edges, bounds.double()).to(torch.int32)  # number of thresholds < each cell's left edge
    next_bound = torch.cat([bounds, torch.tensor([float("inf")])])
    return below.to(device), next_bound.to(device)


def _over_threads(work, n_blocks: int, block_size: int, device: torch.device) -> None:
    """Run ``work(first_block, last_block, chunk_values)`` over all blocks: inline with one torch thread (or
    on a GPU) in large chunks; else split into contiguous ranges, one per thread, in grain-sized chunks."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads == 1 or n_blocks * block_size < threads * _TORCH_GRAIN:
        work(0, n_blocks, chunk_values(device))
        return
    cuts = [n_blocks * i // threads for i in range(threads + 1)]
    jobs = [_workers().submit(work, cuts[i], cuts[i + 1], _TORCH_GRAIN) for i in range(threads)]
    for job in jobs:
        job.result()


def quantize_full_blocks(blocks: torch.Tensor, absmax: torch.Tensor, packed: torch.Tensor,
                         rounding: str = "cpu") -> None:
    """Fill ``absmax`` (fp32[n_blocks]) and ``packed`` for a [n_blocks, block_size] view; no host sync.
    ``rounding``: "cpu" or "cuda", the rule of ``rounding.py``."""
    n_blocks, block_size = blocks.shape

    def work(first, last, chunk):
        half = block_size // 2
        _quantize_range(blocks[first:last], absmax[first:last], packed[first * half : last * half], chunk, rounding)

    _over_threads(work, n_blocks, block_size, blocks.device)


def _quantize_range(blocks: torch.Tensor, absmax: torch.Tensor, packed: torch.Tensor, chunk: int,
                    rounding: str) -> None:
    n_blocks, block_size = blocks.shape
    if n_blocks == 0:
        return
    device = blocks.device
    rows = min(n_blocks, max(1, chunk // block_size))
    below, next_bound = _cell_tables(device, rounding)
    flush = rounding == "cuda" and blocks.dtype != torch.float16  # fp16 values are never subnormal in fp32
    scaled = torch.empty(rows, block_size, dtype=torch.float32, device=device)
    scratch = torch.empty(rows * block_size, dtype=torch.float32, device=device)
    cell = torch.empty(rows * block_size, dtype=torch.int32, device=device)
    codes = torch.empty(rows * block_size, dtype=torch.int32, device=device)
    above = torch.empty(rows * block_size, dtype=torch.bool, device=device)
    pair_bits = torch.empty(rows * block_size // 2, dtype=torch.int64, device=device)
    for start in range(0, n_blocks, rows):
        k = min(rows, n_blocks - start)
        m = k * block_size
        x = scaled[:k]
        x.copy_(blocks[start : start + k])  # to fp32
        if flush:  # subnormal -> 0, as the kernel's FTZ arithmetic reads it
            tiny = torch.lt(torch.abs(x.view(-1), out=scratch[:m]), SMALLEST_NORMAL, out=above[:m])
            x.masked_fill_(tiny.view(k, block_size), 0.0)
        # max |w| = max(max w, -min w): no |w| temporary (and amax + amin beat aminmax on CPU)
        chunk_absmax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_(), out=absmax[start : start + k])
        if rounding == "cuda":
            x.mul_(kernel_reciprocal(chunk_absmax)[:, None])  # a zero block: NaN, code 0 (see above)
        else:
            x.mul_((1.0 / chunk_absmax.clamp(min=SMALLEST_ABSMAX))[:, None])
        x = x.view(-1)
        torch.mul(x, _CELLS_PER_UNIT, out=scratch[:m]).add_(2 * _CELLS_PER_UNIT)  # cell = trunc((x + 2) * 32)
        cell[:m].copy_(scratch[:m]).clamp_(0, 4 * _CELLS_PER_UNIT)  # the clamp only matters for NaN
        torch.index_select(below, 0, cell[:m], out=codes[:m])
        torch.index_select(next_bound, 0, codes[:m], out=scratch[:m])
        codes[:m].add_(torch.gt(x, scratch[:m], out=above[:m]))
        v, p = codes[:m].view(torch.int64), pair_bits[: m // 2]
        torch.bitwise_left_shift(v, 4, out=p).bitwise_or_(v >> 32)
        packed[start * block_size // 2 : start * block_size // 2 + m // 2].copy_(p)  # keeps the low byte


@functools.lru_cache(maxsize=None)
def _byte_to_pair_bits(device: torch.device) -> torch.Tensor:
    """int64[256]: entry b holds the fp32 pair (level of b's high nibble, level of b's low nibble)."""
    byte = torch.arange(256)
    pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]], dim=1).contiguous()
    return pairs.view(torch.int64).view(256).to(device)


@functools.lru_cache(maxsize=1)
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="nf4-worker")


os.register_at_fork(after_in_child=_workers.cache_clear)  # a forked child has none of the parent's threads


def _dequantize_range(packed, absmax, out, block_size, first, last, chunk) -> None:
    """out[first*bs : last*bs] for the blocks first..last-1, ``chunk`` values at a time.

    The per-chunk views are cut up front (``split``, when there is more than one chunk) and the scratch
    views made once, so each chunk costs four torch calls: with small chunks (threaded path) or small
    weights (a layer of a small model) Python overhead is what limits speed.
    """
    if last == first:
        return
    rows = max(1, min(last - first, chunk // block_size))
    half = block_size // 2
    sources = packed[first * half : last * half]                                     # bytes
    scales = absmax[first:last, None]                                                # [blocks, 1] fp32
    targets = out[first * block_size : last * block_size].view(-1, block_size)       # [blocks, bs]
    if rows < last - first:  # per chunk
        sources, scales, targets = sources.split(rows * half), scales.split(rows), targets.split(rows)
    else:
        sources, scales, targets = (sources,), (scales,), (targets,)
    byte_index = torch.empty(rows * half, dtype=torch.int64, device=out.device)
    # fp32 output: gather straight into it (viewed as int64 pairs), no converting copy
    fp32_out = out.dtype == torch.float32 and out.storage_offset() % 2 == 0
    levels = torch.empty(rows * half, dtype=torch.int64, device=out.device)
    products = levels.view(torch.float32).view(rows, block_size)
    pair_bits = _byte_to_pair_bits(out.device)
    for source, scale, target in zip(sources, scales, targets):
        k = target.shape[0]
        idx = byte_index if k == rows else byte_index[: k * half]
        idx.copy_(source)
        if fp32_out:
            torch.index_select(pair_bits, 0, idx, out=target.view(torch.int64).view(-1))
            target.mul_(scale)
            continue
        pairs, product = (levels, products) if k == rows else (levels[: k * half], products[:k])
        torch.index_select(pair_bits, 0, idx, out=pairs)
        target.copy_(product.mul_(scale))  # fp32 product, then the one rounding to bf16/fp16


def dequantize_into(qw: QuantizedWeight, absmax: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write qw's values into ``out`` (flat, contiguous, any float dtype), given its fp32 block absmax."""
    n, bs = qw.numel, qw.block_size
    n_full = n // bs

    def work(first, last, chunk):
        _dequantize_range(qw.packed, absmax, out, bs, first, last, chunk)

    _over_threads(work, n_full, bs, out.device)
    if n_full * bs < n:  # the last, partial block
        pairs = _byte_to_pair_bits(out.device)[qw.packed[n_full * bs // 2 :].long()].view(torch.float32)
        out[n_full * bs :] = pairs[: n - n_full * bs] * absmax[-1]
    return out
