"""Pretrain the small bundled base model on the Python standard library's source (byte tokens).

    python -m llama.pretrain --out llama/assets/tiny-llama --seed 0

Plain next-token training (AdamW, linear warmup then cosine decay, gradient clipping at 1.0), fp32
on CPU with a fixed number of threads (the order of reductions, hence the bytes, depends on it). The
weights are saved in bf16 (``llama.save_checkpoint``) and the final held-out loss is measured on
exactly those bf16 weights, re-read from disk (fp32 arithmetic). Writes ``config.json``,
``model.safetensors`` and ``pretrain_log.json`` (arguments, wall time, loss curve) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .atomic_files import write_atomically
from .checkpoint import load_checkpoint, save_checkpoint
from .cli import Parser, integer, number, progress, run_command
from .config import LlamaConfig
from .corpus import batches, stdlib_tokens, windows
from .model import Llama
from .tokenizer import ByteTokenizer
from .training import mean_loss, warmup_cosine

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-llama"  # what this script wrote, shipped


def tiny_config(hidden: int = 256, layers: int = 6, heads: int = 8, kv_heads: int = 2,
                intermediate: int = 688, seq_len: int = 256) -> LlamaConfig:
    tok = ByteTokenizer()
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=tok.vocab_size,
                       max_position_embeddings=seq_len, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)


def init_weights(model: Llama, std: float = 0.02) -> None:
    """GPT-2 / HF Llama initialisation: every matrix N(0, std), norm weights 1."""
    for name, p in model.named_parameters():
        torch.nn.init.ones_(p) if name.endswith("norm.weight") else torch.nn.init.normal_(p, 0.0, std)


def evaluate(model: Llama, rows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats per token) over ``rows`` (n, seq_len), ``batch_size`` at a time."""
    return mean_loss(model, rows.split(batch_size))


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """Baseline: held-out cross-entropy of the training set's token frequencies (add-one smoothed)."""
    counts = torch.bincount(train.long(), minlength=ByteTokenizer.vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[heldout.long()].mean())


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, each checked against its domain while parsing (``llama.cli``)."""
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=integer(minimum=0), default=0)
    parser.add_argument("--steps", type=integer(minimum=1), default=600)
    parser.add_argument("--batch-size", type=integer(minimum=1), default=16)
    parser.add_argument("--seq-len", type=integer(minimum=2), default=256)
    parser.add_argument("--lr", type=number(above=0), default=3e-3)
    parser.add_argument("--warmup", type=integer(minimum=1), default=50)
    parser.add_argument("--eval-every", type=integer(minimum=1), default=100)
    parser.add_argument("--eval-windows", type=integer(minimum=1), default=256)
    parser.add_argument("--hidden", type=integer(minimum=1), default=256)
    parser.add_argument("--layers", type=integer(minimum=1), default=6)
    parser.add_argument("--heads", type=integer(minimum=1), default=8)
    parser.add_argument("--kv-heads", type=integer(minimum=1), default=2)
    parser.add_argument("--intermediate", type=integer(minimum=1), default=688)
    parser.add_argument("--threads", type=integer(minimum=1), default=1, help="CPU threads; fixed so reruns give the same bytes")
    args = parser.parse_args(argv)
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        parser.error(f"argument --hidden: expected a multiple of 2 x --heads ({2 * args.heads}: even head width), got {args.hidden}")
    if args.heads % args.kv_heads:
        parser.error(f"argument --kv-heads: expected a divisor of --heads ({args.heads}), got {args.kv_heads}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = tiny_config(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.seq_len)
    model = Llama(config)
    init_weights(model)
    train, heldout = stdlib_tokens("train"), stdlib_tokens("heldout")
    eval_windows = windows(heldout, args.seq_len, args.eval_windows)
    baseline = unigram_loss(train, heldout)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; train {train.numel():,} tokens, "
          f"held-out {heldout.numel():,} tokens; unigram baseline {baseline:.4f} nats/token")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    bar = progress(args.steps, desc="pretrain")
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, args.steps, args.lr, args.warmup)
        x = batches(train, args.batch_size, args.seq_len, generator)
        _, loss = model(x, labels=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "train_loss": loss.item(), "heldout_loss": evaluate(model, eval_windows)})
            bar.set_postfix(train=f"{loss.item():.3f}", heldout=f"{curve[-1]['heldout_loss']:.3f}")
        bar.update(1)
    bar.close()

    save_checkpoint(model, args.out, dtype=torch.bfloat16)
    final = evaluate(load_checkpoint(None, args.out).float(), eval_windows)  # bundled bf16 weights, fp32 math
    log = {"command": f"python -m llama.pretrain --out {args.out} --seed {args.seed}", "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
        "unigram_heldout_loss": round(baseline, 4), "final_heldout_loss_bf16": round(final, 4), "curve": curve}
    write_atomically(args.out / "pretrain_log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=2) + "\n"))
    print(f"held-out loss {final:.4f} nats/token (bf16 weights; unigram baseline {baseline:.4f}); "
          f"wall {log['wall_seconds']} s; wrote {args.out}")
    return log


if __name__ == "__main__":
    run_command(main)
