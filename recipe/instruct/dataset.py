"""A JSONL file to encoded examples in one call, with what a run reports and what a resume must match.

    data = load_instruct("chats.jsonl", tokenizer, model_dir, template="auto", seq_len=256)
    print(data.report())   # chats.jsonl: 1110 chat examples, template chatml, 0 truncated, 0 dropped
    data.fingerprint()     # file SHA-256, format, template source hash, train_on_prompt, seq_len, drop_long

``part="train"`` / ``"heldout"`` keeps one side of a deterministic split of the file's examples: an
example is held out when the CRC32 of its canonical JSON (keys sorted, no spaces) falls in the last
``heldout_percent`` of 100 buckets (``llama.corpus.in_heldout``, the rule of the text corpora), so the
split is a property of each example alone, the same on every machine and whatever the line order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from llama.corpus import in_heldout

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
    part: str | None = None
    conversations: list[dict] = field(default_factory=list, repr=False)  # the examples as read, before encoding

    def report(self) -> str:
        template = "none (plain text)" if self.format == "plain" else self.template.name
        part = f" ({self.part} part of the CRC32 split)" if self.part else ""
        return (f"{self.path.name}{part}: {len(self.examples)} {self.format} examples, template {template}, "
                f"{self.counts['truncated']} truncated to {self.seq_len} tokens, {self.counts['dropped']} dropped")

    def fingerprint(self) -> dict:
        """What must be equal for a resumed run to see the same tokens."""
        return {"data_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(), "format": self.format,
                "template": self.template.name,
                "template_sha256": hashlib.sha256(self.template.source.encode()).hexdigest(),
                "train_on_prompt": self.train_on_prompt, "seq_len": self.seq_len, "drop_long": self.drop_long,
                "part": self.part}


def split_part(examples: list[dict], part: str | None, heldout_percent: int = 10) -> list[dict]:
    """The examples of one side (``"train"`` / ``"heldout"``) of the CRC32 split; all for None."""
    if part not in (None, "train", "heldout"):
        raise ValueError(f"part must be None, 'train' or 'heldout', got {part!r}")
    if part is None:
        return examples
    held = [in_heldout(json.dumps(e, sort_keys=True, separators=(",", ":")), heldout_percent) for e in examples]
    return [e for e, h in zip(examples, held) if h == (part == "heldout")]


def load_instruct(path: str | Path, tokenizer, model_dir: str | Path | None, template: str = "auto",
                  seq_len: int = 256, train_on_prompt: bool = False, drop_long: bool = False,
                  part: str | None = None, heldout_percent: int = 10) -> InstructData:
    """Read, render, tokenize and fit a JSONL file (see ``jsonl``, ``templates``, ``encode``, ``batching``);
    ``part``: one side of the CRC32 split (module docstring), or every example (None)."""
    path = Path(path)
    fmt, raw = read_jsonl(path)
    raw = split_part(raw, part, heldout_percent)
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
        raise ValueError(f"{path}: no example is left{f' in its {part} part' if part else ''} to train on "
                         f"({counts['dropped']} dropped at seq_len={seq_len})")
    return InstructData(path, fmt, chat_template, examples, counts, train_on_prompt, seq_len, drop_long, part, raw)
