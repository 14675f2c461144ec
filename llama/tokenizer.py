"""Tokenizers: a byte-level one for the bundled model, Hugging Face ``tokenizer.json`` for real checkpoints.

The byte tokenizer needs no vocabulary file and can encode any text: token i < 256 is byte i, then
BOS = 256 and EOS = 257, so the vocabulary has 258 entries (``ByteTokenizer.vocab_size``).
"""
from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] * bos + ids + [self.eos_token_id] * eos

    def decode(self, ids) -> str:
        """Bytes back to text; BOS/EOS are dropped and invalid UTF-8 is replaced, never raised."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def load_tokenizer(directory: str | Path):
    """``tokenizer.json`` in ``directory`` via the ``tokenizers`` library, else the byte tokenizer
    when the checkpoint's config says vocab_size == 258 (the bundled model)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"{path} needs the optional 'tokenizers' package: pip install tokenizers") from None
        return Tokenizer.from_file(str(path))
    from .config import LlamaConfig

    if LlamaConfig.from_hf(directory).vocab_size == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise FileNotFoundError(f"no tokenizer.json in {directory} and its vocabulary is not the byte tokenizer's")
