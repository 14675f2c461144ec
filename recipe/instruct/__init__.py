"""Instruction and chat data: JSONL examples, chat templates, target masks, packing and token-weighted loss.

    fmt, examples = read_jsonl("chats.jsonl")                          # plain | alpaca | chat
    special = special_tokens(model_dir, tokenizer)                     # bos/eos strings for templates
    template = load_template(model_dir, special, name="auto")          # the checkpoint's, or a built-in
    encoder = TextEncoder(tokenizer, special)
    encoded, counts = fit_length([encode_example(e, template, encoder) for e in examples], seq_len)
    for batch in batches(encoded, batch_size, seq_len, packing=True):  # Batch(input_ids, labels, ...)
        ...  # scaled_loss(logits, batch.labels, global_target_count(...), world_size).backward()

``load_instruct(path, tokenizer, model_dir, template, seq_len)`` does the first five lines in one call.
The bundled instruction set (``data/train.jsonl``, ``data/heldout.jsonl``) is made by
``tools/make_instruct_set.py``.
"""
from ..data import Batch
from .batching import ExampleRows, batches, collate, fit_length, pack
from .dataset import InstructData, load_instruct
from .encode import Encoded, TextEncoder, encode_example, special_tokens
from .jsonl import read_jsonl
from .loss import count_targets, global_target_count, global_targets, scaled_loss, target_tokens, token_losses
from .templates import BUILTIN, ChatTemplate, load_template

__all__ = ["read_jsonl", "BUILTIN", "ChatTemplate", "load_template", "Encoded", "TextEncoder", "encode_example",
           "special_tokens", "Batch", "ExampleRows", "batches", "collate", "fit_length", "pack", "count_targets",
           "target_tokens", "global_targets", "global_target_count", "scaled_loss", "token_losses", "InstructData",
           "load_instruct"]
