"""inject: PEFT-like target patterns, freezing, named errors; merge/unmerge of a model; parameter counts."""
import pytest
import torch
from torch import nn

import lora
from test_lora_fake_base import FakeQuantLinear

HIDDEN, FFN, VOCAB = 16, 24, 11


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({n: nn.Linear(HIDDEN, HIDDEN, bias=False) for n in ("q_proj", "k_proj", "xq_proj")})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(HIDDEN, FFN), "down_proj": nn.Linear(FFN, HIDDEN)})
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        h = self.norm(x)
        x = x + sum(proj(h) for proj in self.attn.values())
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x)))


class TinyModel(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


LINEARS = [f"layers.{i}.{n}" for i in range(2) for n in
           ("attn.q_proj", "attn.k_proj", "attn.xq_proj", "mlp.up_proj", "mlp.down_proj")]


def test_all_linear_wraps_every_linear_but_lm_head_and_freezes_the_rest():
    torch.manual_seed(0)
    model = TinyModel()
    ids = torch.randint(0, VOCAB, (2, 5))
    before = model(ids)
    wrapped = lora.inject(model, "all-linear", r=2, alpha=4)
    assert wrapped == LINEARS
    assert [name for name, _ in lora.lora_layers(model)] == LINEARS
    assert isinstance(model.lm_head, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in LINEARS for ab in "AB"}
    assert [id(p) for p in lora.trainable_parameters(model)] == \
        [id(p) for n, p in model.named_parameters() if n in trainable]
    torch.testing.assert_close(model(ids), before)  # B = 0: step 0 is the base model


@pytest.mark.parametrize("targets, expected", [
    (["q_proj"], ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]),  # suffix after a dot: not xq_proj
    (["layers.1.mlp.up_proj", "k_proj"], ["layers.0.attn.k_proj", "layers.1.attn.k_proj", "layers.1.mlp.up_proj"]),
    (r"layers\.0\.mlp\..*", ["layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]),  # regex, full match
    (r".*_proj", LINEARS),
    (["lm_head"], []),  # excluded by default -> matches nothing -> error (below)
])
def test_target_patterns_follow_peft(targets, expected):
    model = TinyModel()
    if not expected:
        with pytest.raises(ValueError, match="lm_head"):
            lora.inject(model, targets)
        assert lora.inject(TinyModel(), targets, exclude=()) == ["lm_head"]
        return
    assert lora.inject(model, targets) == expected


@pytest.mark.parametrize("targets, named", [
    (["q_proj", "v_proj"], r"\['v_proj'\]"),  # only the entry that matches nothing is named
    ("proj", r"\['proj'\]"),  # a regex must match a whole name
    (["attn"], r"\['attn'\]"),  # a container, not a linear layer
])
def test_a_pattern_matching_nothing_is_a_value_error_naming_it(targets, named):
    with pytest.raises(ValueError, match=named):
        lora.inject(TinyModel(), targets)


def test_bad_argument_types_and_no_double_wrapping():
    with pytest.raises(TypeError, match="target_modules"):
        lora.inject(TinyModel(), 5)
    with pytest.raises(TypeError, match="target_modules"):
        lora.inject(TinyModel(), [])
    with pytest.raises(TypeError, match="exclude"):
        lora.inject(TinyModel(), "all-linear", exclude="lm_head")
    model = TinyModel()
    lora.inject(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="lora_A"):  # LoRA's own pieces are never targets
        lora.inject(model, ["lora_A"])
    assert lora.inject(model, "all-linear", r=2) == [n for n in LINEARS if not n.endswith(".q_proj")]
    assert sum(p.requires_grad for p in model.parameters()) == 2 * len(LINEARS)  # both calls' adapters
    with pytest.raises(ValueError, match=r"match no linear-like module \(after exclude=\['lm_head'\]\)"):
        lora.inject(model, "all-linear")


@pytest.mark.parametrize("dora", [False, True])
def test_model_merge_unmerge(dora):
    torch.manual_seed(0)
    model = TinyModel()
    lora.inject(model, r=2, alpha=4, dora=dora)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    ids = torch.randint(0, VOCAB, (2, 5))
    adapted = model(ids)
    lora.merge(model)
    assert all(layer.merged for _, layer in lora.lora_layers(model))
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)


def test_count_parameters_plain_and_quantized():
    model = TinyModel(layers=1)
    total = sum(p.numel() for p in model.parameters())
    assert lora.count_parameters(model) == (total, total)  # nothing frozen yet
    lora.inject(model, ["q_proj", "up_proj"], r=2)
    lora_params = 2 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + FFN)
    assert lora.count_parameters(model) == (lora_params, total + lora_params)
    assert "trainable params: 144 ||" in str(lora.count_parameters(model))
    # A quantized base counts its out * in logical values (+ bias), not its int8 storage.
    quantized = TinyModel(layers=1)
    quantized.layers[0].mlp["up_proj"] = FakeQuantLinear(quantized.layers[0].mlp["up_proj"])
    lora.inject(quantized, ["up_proj"], r=2)
    assert lora.count_parameters(quantized) == (2 * (HIDDEN + FFN), total + 2 * (HIDDEN + FFN))
