"""Tokenizers: a byte-level one for the bundled model, Hugging Face ``tokenizer.json`` for real checkpoints.

The byte tokenizer needs no vocabulary file and can encode any text: token i < 256 is byte i, then
BOS = 256 and EOS = 257, so the vocabulary has 258 entries (``ByteTokenizer.vocab_size``).

Both kinds answer the same questions: ``load_tokenizer`` gives a Hugging Face tokenizer the
``bos_token_id`` / ``eos_token_id`` of its checkpoint's ``config.json`` (the first EOS when it lists several;
None when there is no config.json), `is_byte_tokenizer` tells the kinds apart, and `encode_document` frames a
plain-text document the same way with either: BOS, the text, EOS (a model without a BOS: the text, EOS).
"""
from __future__ import annotations

from pathlib import Path

from .config import LlamaConfig


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


def is_byte_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is the byte tokenizer (else a ``tokenizers.Tokenizer``): the one place that decides."""
    return isinstance(tokenizer, ByteTokenizer)


def encode_document(tokenizer, text: str) -> list[int]:
    """A plain-text document's ids: BOS (when the model has one), the text's tokens, EOS -- with either kind,
    so a model trained on concatenated documents learns where one ends (the text's own tokens are those of
    ``encode(text, add_special_tokens=False)`` for a Hugging Face tokenizer)."""
    if is_byte_tokenizer(tokenizer):
        return tokenizer.encode(text, bos=True, eos=True)
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("the tokenizer has no eos_token_id to end a document with: load it with "
                         "llama.load_tokenizer from a checkpoint whose config.json sets eos_token_id")
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] * (bos is not None) + tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.eos_token_id]


def load_tokenizer(directory: str | Path):
    """``tokenizer.json`` in ``directory`` via the ``tokenizers`` library, else the byte tokenizer
    when the checkpoint's config says vocab_size == 258 (the bundled model). A ``tokenizer.json`` one is given
    the checkpoint's ``bos_token_id`` and ``eos_token_id`` (module docstring)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"{path} needs the optional 'tokenizers' package: pip install tokenizers") from None
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.bos_token_id, tokenizer.eos_token_id = _special_ids(directory)
        return tokenizer

    if LlamaConfig.from_hf(directory).vocab_size == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise FileNotFoundError(f"no tokenizer.json in {directory} and its vocabulary is not the byte tokenizer's")


def _special_ids(directory: Path) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) of the checkpoint's config.json (the first EOS of a list); (None, None) without one."""
    if not (directory / "config.json").is_file():
        return None, None
    config = LlamaConfig.from_hf(directory)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return config.bos_token_id, eos
