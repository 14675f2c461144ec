"""A JSONL file to encoded examples in one call, with what a run reports and what a resume must match.

    data = load_instruct("chats.jsonl", tokenizer, model_dir, template="auto", seq_len=256)
    print(data.report())   # chats.jsonl: 1110 chat examples, template chatml, 0 truncated, 0 dropped
    data.fingerprint()     # file SHA-256, format, template source hash, train_on_prompt, seq_len, drop_long
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .batching import fit_length
from .encode import Encoded, TextEncoder, encode_example, special_tokens
from .jsonl import read_jsonl
from .templates import ChatTemplate, load_template


@dataclass
class InstructData:
    path: Path
    format: str
    template: ChatTemplate
    examples: list[Encoded]
    counts: dict
    train_on_prompt: bool
    seq_len: int
    drop_long: bool

    def report(self) -> str:
        template = "none (plain text)" if self.format == "plain" else self.template.name
        return (f"{self.path.name}: {len(self.examples)} {self.format} examples, template {template}, "
                f"{self.counts['truncated']} truncated to {self.seq_len} tokens, {self.counts['dropped']} dropped")

    def fingerprint(self) -> dict:
        """What must be equal for a resumed run to see the same tokens."""
        return {"data_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(), "format": self.format,
                "template": self.template.name,
                "template_sha256": hashlib.sha256(self.template.source.encode()).hexdigest(),
                "train_on_prompt": self.train_on_prompt, "seq_len": self.seq_len, "drop_long": self.drop_long}


def load_instruct(path: str | Path, tokenizer, model_dir: str | Path | None, template: str = "auto",
                  seq_len: int = 256, train_on_prompt: bool = False, drop_long: bool = False) -> InstructData:
    """Read, render, tokenize and fit a JSONL file (see ``jsonl``, ``templates``, ``encode``, ``batching``)."""
    path = Path(path)
    fmt, raw = read_jsonl(path)
    special = special_tokens(model_dir, tokenizer)
    chat_template, encoder = load_template(model_dir, special, template), TextEncoder(tokenizer, special)
    encoded = []
    for number, example in enumerate(raw, start=1):
        try:
            encoded.append(encode_example(example, chat_template, encoder, train_on_prompt))
        except ValueError as err:
            raise ValueError(f"{path}: example {number}: {err}") from None
    examples, counts = fit_length(encoded, seq_len, drop_long)
    if not examples:
        raise ValueError(f"{path}: no example is left to train on ({counts['dropped']} dropped at seq_len={seq_len})")
    return InstructData(path, fmt, chat_template, examples, counts, train_on_prompt, seq_len, drop_long)
