"""The shape of a Llama: the fields of a Hugging Face ``config.json`` that the architecture needs.

    LlamaConfig.from_hf("path/to/checkpoint")      # a directory, a config.json path, or a dict
    LlamaConfig.preset("llama-2-70b")              # the published numbers of a released model

Covers Llama 2 (Touvron et al. 2023), Code Llama, TinyLlama and Llama 3 / 3.1 / 3.2 (Grattafiori et
al. 2024): grouped-query attention (``num_key_value_heads`` < ``num_attention_heads``), Llama 3.1's
``rope_scaling`` of type "llama3", and ``tie_word_embeddings`` (the output projection reuses the input
embedding). Reading refuses, naming the field, what the model does not compute: another activation
than SiLU, biases, other RoPE types, partial rotary dimensions, a ``head_dim`` other than
hidden_size / num_attention_heads. ``pretraining_tp`` is accepted whatever its value: transformers 4
split the projections into that many slices and summed them (the same math), transformers 5 ignores it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: dict | None = None  # Llama 3.1: {"rope_type": "llama3", "factor": 8.0, ...}; None: plain RoPE
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2  # Llama 3.1 Instruct lists several
    torch_dtype: str = "float32"  # the dtype the checkpoint stores (informational)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        _, scaling = _read_rope({"rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling}, "LlamaConfig")
        object.__setattr__(self, "rope_scaling", scaling)  # None for plain RoPE, else the checked llama3 keys

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict) -> "LlamaConfig":
        """Read a Hugging Face Llama config: a dict, a ``config.json`` file, or a checkpoint directory.

        Both generations are read: transformers 4 (top-level ``rope_theta``, ``rope_scaling`` with
        ``type`` or ``rope_type``) and transformers 5 (``rope_parameters`` holding the theta too).
        A field asking for math this model does not implement is an error naming the field."""
        raw, source = _read_raw(path_or_dict)
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.name not in raw and f.name != "num_key_value_heads"]
        if missing:
            raise ValueError(f"{source}: Llama config is missing {missing}")
        _refuse_unsupported(raw, source)
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling", "torch_dtype"}
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("num_key_value_heads", raw["num_attention_heads"])  # Llama 1/2-7B omit it
        values["rope_theta"], values["rope_scaling"] = _read_rope(raw, source)
        values["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict that transformers 4 and 5 read back to the same model: the rope in
        both spellings (top-level ``rope_theta``/``rope_scaling``, and ``rope_parameters``)."""
        values = dataclasses.asdict(self)
        if isinstance(self.eos_token_id, tuple):
            values["eos_token_id"] = list(self.eos_token_id)
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "head_dim": self.head_dim, "pretraining_tp": 1,
                **values, "rope_parameters": rope_parameters}

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        """Published shapes: ``llama-2-7b``, ``llama-2-70b``, ``llama-3-70b``, ``llama-3.1-70b``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])


_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=2, torch_dtype="float16")
_LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                   max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001,
                   torch_dtype="bfloat16")
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, **_LLAMA2),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, **_LLAMA2),
    "llama-3-70b": _LLAMA3_70B,
    "llama-3.1-70b": {**_LLAMA3_70B, "max_position_embeddings": 131072,
                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _read_raw(path_or_dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, dict):
        return path_or_dict, "config"
    if not isinstance(path_or_dict, (str, Path)):
        raise TypeError(f"path_or_dict must be a path or a dict, got {type(path_or_dict).__name__}")
    path = Path(path_or_dict)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no Llama config at {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw, str(path)


def _refuse_unsupported(raw: dict, source: str) -> None:
    """Fields whose values would need math this model does not have: an error, never a silent change."""
    expected = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    for field, value in expected.items():
        if field in raw and raw[field] != value:
            raise ValueError(f"{source}: {field}={raw[field]!r} is not supported (only {value!r})")
    heads = raw["num_attention_heads"]
    if raw.get("head_dim") is not None and isinstance(heads, int) and heads > 0 and \
            raw["head_dim"] != raw["hidden_size"] // heads:
        raise ValueError(f"{source}: head_dim={raw['head_dim']} differs from hidden_size / num_attention_heads = "
                         f"{raw['hidden_size'] // heads}, which is not supported")
    tp = raw.get("pretraining_tp", 1)
    if tp is not None and (not isinstance(tp, int) or tp < 1):
        raise ValueError(f"{source}: pretraining_tp={tp!r} must be a positive int")


def _read_rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from ``rope_parameters`` (transformers 5) or the top-level
    ``rope_theta`` / ``rope_scaling`` (transformers 4)."""
    if raw.get("rope_parameters") is not None:
        field, params = "rope_parameters", raw["rope_parameters"]
        if not isinstance(params, dict):
            raise ValueError(f"{source}: rope_parameters must be an object, got {params!r}")
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:
        field, params = "rope_scaling", raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{source}: rope_scaling must be an object or null, got {params!r}")
        theta = raw.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
        raise ValueError(f"{source}: rope_theta={theta!r} must be a number > 1")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: {field}.partial_rotary_factor={params['partial_rotary_factor']} is not "
                         "supported (only 1.0: every dimension rotates)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    return float(theta), _llama3_scaling(params, f"{source}: {field}")


def _llama3_scaling(params: dict, field: str) -> dict:
    """The llama3 scaling parameters, checked; any other rope type is refused (``params``: a dict,
    as `_read_rope` has checked)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "llama3":
        raise ValueError(f"{field}: rope type {kind!r} is not supported (only 'default' and 'llama3')")
    missing = [key for key in LLAMA3_KEYS if key not in params]
    if missing:
        raise ValueError(f"{field}: llama3 rope scaling is missing {missing}")
    bad = [key for key in LLAMA3_KEYS if isinstance(params[key], bool) or not isinstance(params[key], (int, float))
           or not params[key] > 0]
    if bad or params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ValueError(f"{field}: llama3 rope scaling needs positive numbers with high_freq_factor > "
                         f"low_freq_factor, got {params!r}")
    return {"rope_type": "llama3", **{key: params[key] for key in LLAMA3_KEYS}}
