"""Held-out loss of the bundled pretrained model with every decoder-layer linear quantized to 4 bits.

    python -m benchmarks.quant_quality [--model llama/assets/tiny-llama] [--windows 256]
    python -m benchmarks.quant_quality --quick      # 8 windows, seconds (what the test runs)

QLoRA (Dettmers et al. 2023, section 3 and Table 2) finds NF4 better than FP4 and plain integer
4-bit at equal bits. Here the same question on a real, if tiny, pretrained Llama: each format
quantizes then dequantizes the weight (block size 64), the model runs in fp32, and the loss is the
mean next-token cross-entropy (nats/token) on the held-out split of the stdlib corpus. Embeddings,
lm_head and norms stay as bundled (bf16). Formats:
  bf16              the bundled weights (the reference)
  NF4 (ours)        nf4.quantize(w, 64, double_quant=True).dequantize()
  NF4 (bnb)         bitsandbytes quantize_4bit(quant_type="nf4"), as a cross-check of ours
  FP4 (bnb)         bitsandbytes quantize_4bit(quant_type="fp4") (1 sign, 2 exponent, 1 mantissa bit)
  Int4 absmax       round(w / absmax * 7) per block of 64, 15 evenly spaced levels in [-absmax, absmax]
                    (``nf4.int4_baseline``, the same baseline ``benchmarks/nf4.py`` reports)
"""
from __future__ import annotations

import argparse
import copy
import functools
import time
from pathlib import Path
from typing import Callable

import torch

import llama
import nf4
from llama.cli import Parser, integer, run_command
from llama.corpus import stdlib_tokens, windows as heldout_windows
from llama.pretrain import BUNDLED_MODEL, evaluate
from nf4.int4_baseline import int4_absmax_roundtrip

BLOCK = 64


int4_absmax = functools.partial(int4_absmax_roundtrip, block_size=BLOCK)


def nf4_ours(w: torch.Tensor) -> torch.Tensor:
    return nf4.quantize(w.float(), block_size=BLOCK, double_quant=True).dequantize()


def bnb_4bit(quant_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def fake_quantize(w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        # Flattened to blocks: bitsandbytes 0.50.2's CPU dequantize_4bit mis-decodes a 2-D weight whose rows
        # are not a multiple of the block size (down_proj: 688); the packed bytes are the same either way.
        blocks = w.float().reshape(-1, BLOCK)
        packed, state = F.quantize_4bit(blocks, blocksize=BLOCK, quant_type=quant_type, compress_statistics=True)
        return F.dequantize_4bit(packed, state).reshape(w.shape)

    return fake_quantize


FORMATS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "bf16": None, "NF4 (ours)": nf4_ours, "NF4 (bnb)": bnb_4bit("nf4"), "FP4 (bnb)": bnb_4bit("fp4"),
    "Int4 absmax": int4_absmax,
}


def quantize_linears(model: llama.Llama, fake_quantize) -> llama.Llama:
    """A copy of ``model`` whose decoder-layer linear weights went through ``fake_quantize``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight).to(module.weight.dtype))
    return model


def heldout_losses(model_dir: Path, windows: torch.Tensor, formats=FORMATS) -> dict[str, float]:
    base = llama.load_checkpoint(None, model_dir).float()  # bf16 weights held exactly in fp32
    return {name: evaluate(base if fq is None else quantize_linears(base, fq), windows)
            for name, fq in formats.items()}


def main(argv=None) -> dict[str, float]:
    parser = Parser(prog="python -m benchmarks.quant_quality", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--windows", type=integer(minimum=1), default=256, help="held-out windows of max_position_embeddings bytes")
    parser.add_argument("--quick", action="store_true", help="8 windows: checks the table in seconds")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"argument --model: no config.json in {args.model} (a Hugging Face Llama directory is expected)")
    if args.quick:
        args.windows = 8
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and far faster on a busy shared CPU
    config = llama.LlamaConfig.from_hf(args.model)
    windows = heldout_windows(stdlib_tokens("heldout"), config.max_position_embeddings, args.windows)
    start = time.perf_counter()
    losses = heldout_losses(args.model, windows)
    print(f"held-out loss, {windows.numel():,} tokens of the stdlib held-out split, "
          f"every decoder-layer linear quantized (block {BLOCK}); {time.perf_counter() - start:.0f} s\n")
    print("| format | held-out loss (nats/token) | vs bf16 |")
    print("|---|---|---|")
    for name, loss in losses.items():
        print(f"| {name} | {loss:.4f} | {loss - losses['bf16']:+.4f} |")
    return losses


if __name__ == "__main__":
    run_command(main)
