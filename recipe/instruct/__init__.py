"""Instruction and chat data: JSONL examples, chat templates, target masks, packing and token-weighted loss.

    fmt, examples = read_jsonl("chats.jsonl")                      # plain | alpaca | chat
    template = load_template(model_dir, special, name="auto")      # the checkpoint's, or a built-in
    encoded = [encode_example(e, template, TextEncoder(tok, special)) for e in examples]
    batches = pack(encoded, seq_len)  or  pad_batches(encoded, batch_size)
"""
from .encode import Encoded, TextEncoder, encode_example, special_tokens
from .jsonl import read_jsonl
from .templates import BUILTIN, ChatTemplate, load_template

__all__ = ["read_jsonl", "BUILTIN", "ChatTemplate", "load_template", "Encoded", "TextEncoder", "encode_example",
           "special_tokens"]
