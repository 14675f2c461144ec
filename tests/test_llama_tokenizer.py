"""llama.tokenizer: one function tells the byte tokenizer from a Hugging Face one, and a plain-text document
is framed BOS ... EOS by either kind (recipe.data.tokenize_splits concatenates documents framed so)."""
import json

import pytest
import torch
from reference_libs import reference
from test_instruct_templates import train_bpe

import llama
from llama.tokenizer import encode_document, is_byte_tokenizer
from recipe.data import tokenize_splits

DOCUMENTS = {f"doc{i}": f"Document number {i} says import os." for i in range(12)}


def hf_checkpoint(directory, bos_token_id, eos_token_id):
    """tokenizer.json (BPE trained offline, Llama's post-processor adding <s>) beside a config.json."""
    tokenizers = reference("tokenizers")
    tok = train_bpe(300, ["<s>", "</s>"], documents=1)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = llama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=300, bos_token_id=bos_token_id,
                               eos_token_id=eos_token_id)
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    return directory


def test_the_byte_tokenizer_frames_a_document_bos_text_eos():
    tok = llama.ByteTokenizer()
    assert is_byte_tokenizer(tok)
    assert encode_document(tok, "hi") == [256, *b"hi", 257]
    train, _ = tokenize_splits(DOCUMENTS, tok)
    assert (train == 256).sum() == (train == 257).sum() > 0 and train[0] == 256 and train[-1] == 257


def test_a_hugging_face_tokenizer_frames_a_document_bos_text_eos(tmp_path):
    tok = llama.load_tokenizer(hf_checkpoint(tmp_path / "m", bos_token_id=0, eos_token_id=1))
    assert not is_byte_tokenizer(tok) and (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    text = "import os"
    assert encode_document(tok, text) == [0, *tok.encode(text, add_special_tokens=False).ids, 1]
    assert encode_document(tok, text)[:-1] == tok.encode(text).ids  # the post-processor's BOS, not a second one
    train, heldout = tokenize_splits(DOCUMENTS, tok)
    for ids in (train, heldout):
        assert (ids == 0).sum() == (ids == 1).sum() > 0 and ids[0] == 0 and ids[-1] == 1


def test_a_model_without_bos_gets_text_then_eos_and_one_without_eos_is_refused(tmp_path):
    tok = llama.load_tokenizer(hf_checkpoint(tmp_path / "m", bos_token_id=None, eos_token_id=[1, 0]))
    assert encode_document(tok, "x") == [*tok.encode("x", add_special_tokens=False).ids, 1]  # the first listed EOS
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ValueError, match="eos_token_id"):
        encode_document(llama.load_tokenizer(tmp_path / "m"), "x")
    assert torch.equal(torch.tensor(encode_document(llama.ByteTokenizer(), "")), torch.tensor([256, 257]))
