"""The fine-tuning corpus and the resumable sampler (recipe/data.py)."""
import pytest
import torch

from llama import ByteTokenizer
from llama.corpus import stdlib_files
from recipe.data import Batch, Sampler, eval_batches, load_documents, pydoc_topics_path, tokenize_splits, windows


def test_default_corpus_is_the_pydoc_topics_and_not_in_pretraining():
    docs = load_documents()
    assert "if" in docs and "while" in docs and "The \"if\" statement" in docs["if"]
    pretraining = set(stdlib_files("train")) | set(stdlib_files("heldout"))
    assert pydoc_topics_path() not in pretraining


def test_split_is_deterministic_disjoint_and_byte_tokenized():
    docs = load_documents()
    train, heldout = tokenize_splits(docs, ByteTokenizer())
    train2, heldout2 = tokenize_splits(docs, ByteTokenizer())
    assert torch.equal(train, train2) and torch.equal(heldout, heldout2)
    assert len(heldout) > 2048 and len(train) > 10 * len(heldout)
    assert train.max() <= 257 and train[0] == ByteTokenizer.bos_token_id
    total = sum(len(t.encode()) + 2 for t in docs.values())  # every byte + BOS/EOS, nothing lost
    assert len(train) + len(heldout) == total


def test_data_flag_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta " * 100)
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    assert sorted(load_documents(tmp_path)) == ["a.txt", "sub/b.md"]
    one = load_documents(tmp_path / "a.txt")
    train, heldout = tokenize_splits(one, ByteTokenizer(), heldout_percent=10)
    assert len(train) == int(602 * 0.9) and len(train) + len(heldout) == 602
    with pytest.raises(FileNotFoundError, match="nope"):
        load_documents(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        load_documents(tmp_path / "empty")


def test_ranks_split_the_global_batch_and_a_restored_sampler_continues_exactly():
    data = windows(torch.arange(50 * 4), 4)                 # 50 windows of 4 tokens
    whole = Sampler(data, batch_size=6, seed=3)              # one rank, global batch 6
    ranks = [Sampler(data, batch_size=3, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(20):                                      # crosses epoch boundaries (50 / 6)
        assert torch.equal(whole.next_batch().input_ids, torch.cat([s.next_batch().input_ids for s in ranks]))
    state = ranks[0].state_dict()
    expected = [ranks[0].next_batch().input_ids for _ in range(5)]
    resumed = Sampler(data, batch_size=3, rank=0, world_size=2, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch().input_ids, e) for e in expected)


def test_an_epoch_visits_every_window_once():
    data = windows(torch.arange(10 * 2), 2)
    s = Sampler(data, batch_size=5, seed=0)
    seen = torch.cat([s.next_batch().input_ids for _ in range(2)])[:, 0] // 2
    assert sorted(seen.tolist()) == list(range(10))


def test_eval_batches_are_fixed_and_sliced_per_rank():
    data = windows(torch.arange(20 * 2), 2)
    one = [b.input_ids for b in eval_batches(data, 4, 3)]
    two = [[b.input_ids for b in eval_batches(data, 2, 3, rank=r, world_size=2)] for r in range(2)]
    for b in range(3):
        assert torch.equal(one[b], torch.cat([two[0][b], two[1][b]]))


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="seq_len"):
        windows(torch.arange(5), 8)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        windows(torch.arange(5), 0)
    with pytest.raises(ValueError, match="max_windows must be an int >= 1 or None, got 0"):
        windows(torch.arange(5), 2, max_windows=0)
    with pytest.raises(ValueError, match="global batch"):
        Sampler(windows(torch.arange(8), 2), batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="got batch_size=0, n_batches=1, rank=0, world_size=1"):
        next(eval_batches(windows(torch.arange(8), 2), 0, 1))
    with pytest.raises(ValueError, match="seed"):
        Sampler(windows(torch.arange(8), 2), batch_size=1, seed=1).load_state_dict({"epoch": 0, "position": 0, "seed": 2, "rows": 4})


def test_a_batch_of_plain_text_predicts_its_own_next_tokens_and_passes_only_what_it_has():
    ids = torch.arange(6).view(2, 3)
    batch = Batch.of_text(ids)
    assert batch.labels is ids and len(batch) == 2
    assert set(batch.model_inputs()) == {"input_ids", "labels"}  # no None position_ids / attention_mask
    masked = Batch(ids, ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).to(torch.device("cpu"))
    assert set(masked.model_inputs()) == {"input_ids", "labels", "attention_mask"} and masked.position_ids is None
