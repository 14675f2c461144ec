"""Packing vs padding on the bundled instruction set: training tokens per second and padding wasted.

    python -m benchmarks.packing [--examples 256] [--batch-size 8] [--seq-len 256] [--repeats 3] [--model DIR] [--quick]

The bundled chat set (``recipe/instruct/data/train.jsonl``), ChatML template, byte tokenizer, in a
shuffled order, as three batchings of ``--batch-size`` rows each:

  (a) packing: examples packed first-fit into ``--seq-len`` rows, block-diagonal causal mask;
  (b) padding: one example a row, each batch padded to its longest row (the reference for the ratios);
  (c) padding, length-sorted: the same after sorting the examples by length (less padding, but every
      batch then holds examples of one length, a bias the shuffled order does not have).

Each runs one forward+backward of the token-weighted loss over all its batches on a Llama of the
bundled model's shape (``--model``'s ``config.json``, default the bundled tiny-llama; ``--quick``: 1
layer of hidden 32, 16 examples in batches of 4), fp32, on the CPU. Time: ``--repeats`` times after a
warm-up, the variants interleaved in each repeat; the fastest is shown. Tokens per second count the
examples' real tokens only; padding is the share of token slots that hold no example token.
"""
import random
from pathlib import Path

import torch

import llama
from llama.cli import Parser, integer, run_command
from llama.pretrain import BUNDLED_MODEL
from recipe.instruct.batching import batches
from recipe.instruct.corpus import BUNDLED_TRAIN
from recipe.instruct.dataset import load_instruct
from recipe.instruct.loss import global_target_count, scaled_loss

from . import timed

def encoded_set(n_examples: int, seq_len: int, seed: int = 0):
    data = load_instruct(BUNDLED_TRAIN, llama.ByteTokenizer(), None, "chatml", seq_len)
    examples = list(data.examples)
    random.Random(seed).shuffle(examples)
    return examples[:n_examples]


def train_pass(model, batch_list) -> None:
    """One forward+backward of every batch with the token-weighted loss (gradients accumulate)."""
    total = global_target_count([batch.labels for batch in batch_list])
    for batch in batch_list:
        logits = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        scaled_loss(logits, batch.labels, total).backward()


def main(argv=None):
    parser = Parser(prog="python -m benchmarks.packing", description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=integer(minimum=1), default=256)
    parser.add_argument("--batch-size", type=integer(minimum=1), default=8)
    parser.add_argument("--seq-len", type=integer(minimum=2), default=256)
    parser.add_argument("--repeats", type=integer(minimum=1), default=3)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="config.json's shape")
    parser.add_argument("--quick", action="store_true", help="1 layer of hidden 32, 16 examples, batch 4, 1 repeat")
    args = parser.parse_args(argv)
    config = llama.LlamaConfig.from_hf(args.model)
    if args.quick:
        args.examples, args.batch_size, args.repeats = 16, 4, 1
        config = llama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=258, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    model = llama.Llama(config).float()
    encoded = encoded_set(args.examples, args.seq_len)
    real = sum(len(e) for e in encoded)
    variants = {"(a) packing": batches(encoded, args.batch_size, args.seq_len, packing=True),
                "(b) padding": batches(encoded, args.batch_size, args.seq_len, packing=False),
                "(c) padding, length-sorted": batches(sorted(encoded, key=len), args.batch_size, args.seq_len,
                                                      packing=False)}
    times = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):  # the first round is a warm-up
        for name, batch_list in variants.items():
            seconds = timed(lambda: train_pass(model, batch_list), torch.device("cpu"))
            model.zero_grad(set_to_none=True)
            if repeat:
                times[name].append(seconds)
    print(f"{len(encoded)} examples ({real} tokens) of the bundled set, ChatML, batch {args.batch_size} rows, "
          f"seq-len {args.seq_len}; Llama hidden {config.hidden_size} x {config.num_hidden_layers} layers, fp32, CPU")
    print()
    print("| variant | batches | token slots | padding | fwd+bwd s (min) | real tokens/s | tokens/s vs (b) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = real / min(times["(b) padding"])
    for name, batch_list in variants.items():
        slots = sum(batch.input_ids.numel() for batch in batch_list)
        rate = real / min(times[name])
        print(f"| {name} | {len(batch_list)} | {slots} | {1 - real / slots:.1%} | {min(times[name]):.2f} | "
              f"{rate:.0f} | {rate / reference:.2f}x |")


if __name__ == "__main__":
    run_command(main)
