"""llama.tokenizer + llama.corpus: byte tokens, optional tokenizers library, the stdlib corpus split."""
import builtins
import json

import pytest
import torch

import llama
from llama.corpus import batches, stdlib_files, stdlib_root, stdlib_tokens, windows


def test_byte_tokenizer_round_trips_any_text():
    tok = llama.ByteTokenizer()
    text = "def f(x):\n    return x  # ünïcode ✓"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and len(ids) == len(text.encode()) + 2
    assert max(ids) < tok.vocab_size == 258
    assert tok.decode(ids) == text
    assert tok.decode([0xFF, 65]) == "\ufffdA"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


def test_load_tokenizer_picks_bytes_for_the_bundled_vocab_and_explains_missing_library(tmp_path, monkeypatch):
    config = llama.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                               num_key_value_heads=1, vocab_size=258)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    assert isinstance(llama.load_tokenizer(tmp_path), llama.ByteTokenizer)
    (tmp_path / "tokenizer.json").write_text("{}")
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("simulated: not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        llama.load_tokenizer(tmp_path)


def test_split_is_deterministic_disjoint_and_excludes_pydoc_data_and_tests():
    train, heldout = stdlib_files("train"), stdlib_files("heldout")
    assert train == sorted(train) and train == stdlib_files("train")
    assert len(heldout) > 10 and len(train) > 10 * len(heldout)
    assert not set(train) & set(heldout)
    root = stdlib_root()
    relative = [p.relative_to(root).parts for p in train + heldout]
    assert not any("pydoc_data" in parts or "site-packages" in parts or "test" in parts[:-1] for parts in relative)
    assert (root / "pydoc_data" / "topics.py").is_file()  # the fine-tuning domain exists, just not here
    with pytest.raises(ValueError, match="split"):
        stdlib_files("validation")


def test_split_depends_on_names_only(tmp_path):
    """A machine with extra or missing files keeps every other file on the same side."""
    for name in ("a.py", "b.py", "pkg/c.py", "pkg/d.py", "pydoc_data/topics.py", "test/test_x.py") + tuple(
            f"m{i}.py" for i in range(40)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    before = {s: stdlib_files(s, root=tmp_path) for s in ("train", "heldout")}
    assert not any("pydoc_data" in str(p) or "/test/" in str(p) for s in before.values() for p in s)
    (tmp_path / "m3.py").unlink()
    after = {s: stdlib_files(s, root=tmp_path) for s in ("train", "heldout")}
    for split in before:
        assert [p for p in before[split] if p.name != "m3.py"] == after[split]


def test_tokens_batches_and_windows():
    data = stdlib_tokens("heldout")
    assert data.dtype == torch.int16 and data.numel() > 100_000
    assert data[0] == llama.ByteTokenizer.bos_token_id and data[-1] == llama.ByteTokenizer.eos_token_id
    assert int(data.max()) < llama.ByteTokenizer.vocab_size and int(data.min()) >= 0
    x = batches(data, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x, batches(data, 4, 32, torch.Generator().manual_seed(0)))
    w = windows(data, 64, max_windows=10)
    assert w.shape == (10, 64) and torch.equal(w[0], data[:64].long())
    with pytest.raises(ValueError, match="seq_len"):
        batches(data[:10], 1, 32, torch.Generator())
