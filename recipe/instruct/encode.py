"""Examples to token ids and a target mask: which tokens the loss counts.

A chat example is rendered by its template (``templates.py``) and the whole text is tokenized at once,
with no special tokens added (what ``transformers.apply_chat_template`` does, so the ids are the same);
a token is a target when it overlaps an assistant turn's characters (the rule of transformers'
``return_assistant_tokens_mask``), or always with ``train_on_prompt``. EOS closes every response: an
assistant turn whose tokens hold no EOS gets one inserted after it, as a target. A plain ``{"text"}``
example is ``bos_token + text + eos_token``, every token a target.

Special tokens are written in the text as strings (``bos_token``, ``eos_token``, and whatever the
template writes, e.g. ``<|eot_id|>``). A ``tokenizers.Tokenizer`` knows its added tokens; for the bundled
byte tokenizer ``<s>`` is BOS and ``</s>`` is EOS (so those strings in a message become BOS/EOS too,
as special-token strings do in transformers unless sanitized).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llama.tokenizer import is_byte_tokenizer

BYTE_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class Encoded:
    """One example: token ids and, for each, whether the loss counts it."""
    ids: list[int]
    targets: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def special_tokens(model_dir: str | Path | None, tokenizer) -> dict[str, str]:
    """The special-token strings a template is rendered with: the byte tokenizer's, else those of the
    checkpoint's ``tokenizer_config.json`` (a string or an ``{"content": ...}`` object each), with BOS and
    EOS falling back to the ids in its ``config.json``."""
    if is_byte_tokenizer(tokenizer):
        return dict(BYTE_SPECIAL_TOKENS)
    config_path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tokens = {}
    for key in SPECIAL_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[key] = value
    model_config_path = Path(model_dir) / "config.json"
    if ("bos_token" not in tokens or "eos_token" not in tokens) and model_config_path.is_file():
        model_config = json.loads(model_config_path.read_text(encoding="utf-8"))
        for key in ("bos_token", "eos_token"):
            if key not in tokens and model_config.get(key + "_id") is not None:
                tokens[key] = tokenizer.id_to_token(int(model_config[key + "_id"]))
    if "eos_token" not in tokens:
        raise ValueError(f"{model_dir}: no eos_token in tokenizer_config.json nor eos_token_id in config.json")
    return tokens


class TextEncoder:
    """Text (special tokens written as strings) to ``(ids, character offsets)``."""

    def __init__(self, tokenizer, special: dict[str, str]):
        self.tokenizer, self.special = tokenizer, special
        self.is_bytes = is_byte_tokenizer(tokenizer)
        if self.is_bytes:
            self._ids = {special["bos_token"]: tokenizer.bos_token_id, special["eos_token"]: tokenizer.eos_token_id}
            self._split = re.compile("(" + "|".join(map(re.escape, sorted(self._ids, key=len, reverse=True))) + ")")
            self.eos_token_id = tokenizer.eos_token_id
        else:
            self.eos_token_id = tokenizer.token_to_id(special["eos_token"])
            if self.eos_token_id is None:
                raise ValueError(f"eos_token {special['eos_token']!r} is not in the tokenizer's vocabulary")

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not self.is_bytes:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
            return list(encoding.ids), list(encoding.offsets)
        ids, offsets, position = [], [], 0
        for piece in self._split.split(text):
            if piece in self._ids:
                ids.append(self._ids[piece])
                offsets.append((position, position + len(piece)))
            else:
                for i, char in enumerate(piece):
                    utf8 = char.encode("utf-8")
                    ids += utf8
                    offsets += [(position + i, position + i + 1)] * len(utf8)
            position += len(piece)
        return ids, offsets


def encode_example(example: dict, template, encoder: TextEncoder, train_on_prompt: bool = False) -> Encoded:
    """Ids and target mask of a ``{"text"}`` or ``{"messages"}`` example (see the module docstring)."""
    if "text" in example:
        special = encoder.special
        ids, _ = encoder.encode(special.get("bos_token", "") + example["text"] + special["eos_token"])
        return Encoded(ids, [True] * len(ids))
    text, spans = template.assistant_spans(example["messages"])
    ids, offsets = encoder.encode(text)
    targets = [train_on_prompt] * len(ids)
    for start, end in reversed(spans):  # from the last turn, so an inserted EOS shifts nothing still to do
        inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
        for k in inside:
            targets[k] = True
        if not any(ids[k] == encoder.eos_token_id for k in inside):
            after = inside[-1] + 1 if inside else sum(a < end for a, _ in offsets)
            ids.insert(after, encoder.eos_token_id)
            targets.insert(after, True)
    return Encoded(ids, targets)
