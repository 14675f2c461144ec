"""llama.masks + the model's position_ids / attention_mask / kv_cache: packing, left padding, the cache."""
import pytest
import torch

import llama
from llama.kv_cache import KVCache
from llama.masks import (causal_mask, document_mask, document_positions, is_segment_start, padded_mask,
                         padded_positions)

CONFIG = llama.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=100, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return llama.Llama(CONFIG).eval()


def test_builders_on_a_small_example():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    assert document_positions(seg).tolist() == [[0, 1, 0, 1, 2, 0]]
    assert is_segment_start(seg).tolist() == [[True, False, True, False, False, True]]
    mask = document_mask(seg)[0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                    [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert causal_mask(2, 4)[0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert padded_positions(valid).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert padded_mask(valid)[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert padded_mask(valid, q_len=1)[:, 0].int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_default_path_is_is_causal_sdpa(model):
    ids = torch.randint(0, 100, (2, 12))
    explicit = model(ids, position_ids=torch.arange(12).expand(2, 12), attention_mask=causal_mask(12).expand(2, 12, 12))
    assert (model(ids) - explicit).abs().max() < 1e-5


def test_a_packed_row_gives_each_example_what_it_gets_alone(model):
    """Positions past original_max_position_embeddings=8, so llama3 scaling is in play."""
    torch.manual_seed(1)
    a, b = torch.randint(0, 100, (1, 11)), torch.randint(0, 100, (1, 14))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 11 + [1] * 14])
    labels = packed.clone()
    labels[is_segment_start(seg)] = -100
    logits, loss = model(packed, labels, position_ids=document_positions(seg), attention_mask=document_mask(seg))
    (logits_a, loss_a), (logits_b, loss_b) = model(a, a), model(b, b)
    assert (logits[:, :11] - logits_a).abs().max() < 1e-5 and (logits[:, 11:] - logits_b).abs().max() < 1e-5
    mean_alone = (loss_a * 10 + loss_b * 13) / 23  # the packed loss averages all 23 scored tokens
    assert abs(loss.item() - mean_alone.item()) < 1e-5
    unmasked = model(packed)[:, 11:]
    assert (unmasked - logits_b).abs().max() > 1e-2  # without the mask, b would see a


def test_left_padded_rows_get_what_they_get_alone(model):
    short, long = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 9))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :4] = False
    logits = model(ids, position_ids=padded_positions(valid), attention_mask=padded_mask(valid))
    assert torch.isfinite(logits).all()
    assert (logits[0, 4:] - model(short)[0]).abs().max() < 1e-5 and (logits[1] - model(long)[0]).abs().max() < 1e-5


def test_prefill_then_decode_equals_the_full_forward(model):
    ids = torch.randint(0, 100, (2, 13))
    cache = KVCache(CONFIG, batch_size=2, max_length=16)
    steps = [model(ids[:, :9], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 13)]
    assert cache.length == 13 and cache.keys[0].shape == (2, 2, 16, 8)  # kv heads only
    assert (torch.cat(steps, 1) - model(ids)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="16 positions"):
        model(ids[:, :4], kv_cache=cache)


def test_bad_inputs_are_named(model):
    ids = torch.randint(0, 100, (1, 4))
    with pytest.raises(ValueError, match="token id 100, outside the vocabulary 0..99"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="integer"):
        model(ids.float())
    with pytest.raises(ValueError, match="empty"):
        model(ids[:, :0])
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"attention_mask must be a bool tensor of shape \(batch, q_len, kv_len\)"):
        model(ids, attention_mask=causal_mask(4).float())
    with pytest.raises(ValueError, match=r"segment_ids must be a \(batch, seq\) tensor, got shape \(4,\)"):
        document_mask(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"valid must be a \(batch, seq\) tensor, got list"):
        padded_mask([[True, False]])
    with pytest.raises(ValueError, match="q_len"):
        causal_mask(3, 2)
