"""The shape of a Llama: the fields of a Hugging Face ``config.json`` that the architecture needs.

    LlamaConfig.from_hf("path/to/checkpoint")      # a directory, a config.json path, or a dict
    LlamaConfig.preset("llama-2-70b")              # the published numbers of a released model

Covers Llama 2 (Touvron et al. 2023) and Llama 3 / 3.1 (Grattafiori et al. 2024): grouped-query
attention (``num_key_value_heads`` < ``num_attention_heads``), Llama 3.1's ``rope_scaling`` of type
"llama3", and ``tie_word_embeddings`` (the output projection reuses the input embedding).
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
    rope_scaling: dict | None = None  # Llama 3.1: {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
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
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict) -> "LlamaConfig":
        """Read a Hugging Face Llama config: a dict, a ``config.json`` file, or a checkpoint directory."""
        if isinstance(path_or_dict, dict):
            raw = path_or_dict
        elif isinstance(path_or_dict, (str, Path)):
            path = Path(path_or_dict)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"no Llama config at {path}")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        else:
            raise TypeError(f"path_or_dict must be a path or a dict, got {type(path_or_dict).__name__}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in raw and f.name != "num_key_value_heads"]
        if missing:
            raise ValueError(f"Llama config is missing {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("num_key_value_heads", raw["num_attention_heads"])  # Llama 1/2-7B omit it
        if raw.get("head_dim") not in (None, raw["hidden_size"] // raw["num_attention_heads"]):
            raise ValueError(f"head_dim={raw['head_dim']} != hidden_size / num_attention_heads is not supported")
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict that transformers' ``LlamaConfig`` reads back."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_act": "silu", **dataclasses.asdict(self)}

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
