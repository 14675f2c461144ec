"""llama.generate: greedy equal to transformers' generate, sampling rules, stop ids, and a KV cache that
never runs the prompt twice."""
import pytest
import torch
from reference_libs import reference

import llama
from llama.pretrain import BUNDLED_MODEL
from llama.generate import Sampling, next_token

BUNDLED = str(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A tiny random Llama (GQA, llama3 rope scaling) saved by transformers; every linear has a multiple of
    32 outputs (what bitsandbytes' CPU 4-bit kernel needs)."""
    transformers = reference("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16},
                                      bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the 0.02 init, so the logits are not near-ties
        for p in model.parameters():
            p.mul_(5 if p.dim() == 2 else 1)
    path = tmp_path_factory.mktemp("random-llama")
    model.save_pretrained(path)
    return path


def ours_and_theirs(path):
    transformers = reference("transformers")
    ours = llama.load_checkpoint(None, path).float().eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def hf_greedy(theirs, prompts, max_new_tokens, eos):
    """transformers generate(do_sample=False) on left-padded prompts; the new tokens up to eos."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=0)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


@pytest.mark.parametrize("checkpoint", ["random", "bundled"])
def test_greedy_equals_transformers_alone_and_left_padded_in_a_batch(checkpoint, random_checkpoint):
    path = random_checkpoint if checkpoint == "random" else BUNDLED
    ours, theirs = ours_and_theirs(path)
    if checkpoint == "bundled":
        tok = llama.ByteTokenizer()
        prompts = [tok.encode("def main():\n    "), tok.encode("import os\nimport sys\n\n\ndef read_config(path):")]
    else:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 23, 12)]
    eos = ours.config.eos_token_id
    batched = llama.generate(ours, prompts, 24, stop_ids=[eos])
    assert batched == hf_greedy(theirs, prompts, 24, eos)
    assert [llama.generate(ours, [p], 24, stop_ids=[eos])[0] for p in prompts] == batched
    assert max(map(len, batched)) == 24  # not a trivially short continuation


def test_stops_at_any_stop_id_and_only_that_sequence(random_checkpoint):
    ours, _ = ours_and_theirs(random_checkpoint)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    free = llama.generate(ours, prompts, 10)
    at = next(i for i, t in enumerate(free[0]) if i > 0 and t not in free[0][:i] and t not in free[1])
    stopped = llama.generate(ours, prompts, 10, stop_ids=[299, free[0][at]])
    assert stopped == [free[0][:at + 1], free[1]]


def test_decode_runs_one_token_per_sequence_never_the_prompt_again(random_checkpoint):
    ours, _ = ours_and_theirs(random_checkpoint)
    seen = []
    hook = ours.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    streamed = []
    out = llama.generate(ours, [[3] * 7, [4] * 11], 6, on_token=lambda i, t: streamed.append((i, t)))
    hook.remove()
    assert seen == [(2, 11)] + [(2, 1)] * 5  # prefill the padded prompts, then one token per sequence per step
    assert sorted(streamed) == sorted((i, t) for i, row in enumerate(out) for t in row)


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, Sampling()).eq(0).all()
    assert next_token(logits, Sampling(temperature=1.0, top_k=1), g).eq(0).all()
    assert next_token(logits, Sampling(temperature=1.0, top_p=0.01), g).eq(0).all()
    top2 = next_token(logits, Sampling(temperature=1.0, top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # nucleus 0.8: tokens 0 and 1 (0.61 + 0.22 = 0.83 >= 0.8)
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert set(next_token(logits, Sampling(temperature=1.0, top_p=0.8), g).tolist()) == {0, 1}
    counts = torch.bincount(next_token(logits, Sampling(temperature=2.0), g), minlength=5).float() / 4000
    torch.testing.assert_close(counts, (logits[0] / 2).softmax(-1), atol=0.03, rtol=0)
    same = [next_token(logits[:8], Sampling(temperature=1.0), torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*same)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_bad_prompts_are_named(random_checkpoint):
    ours, _ = ours_and_theirs(random_checkpoint)
    for prompts, message in (([], "prompts"), ([[1, 2], []], r"prompts\[1\]"), ([[1, 300]], r"0\.\.299"),
                             ([[1]], "max_new_tokens")):
        with pytest.raises(ValueError, match=message):
            llama.generate(ours, prompts, 0 if message == "max_new_tokens" else 3)
