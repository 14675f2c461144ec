"""bitsandbytes interop: a QuantizedWeight <-> the state-dict entries of a bitsandbytes ``Linear4bit``.

bitsandbytes stores one NF4 weight under a prefix (``weight``) as

    weight                                 uint8 [ceil(numel/2), 1]   the packed codes
    weight.absmax                          fp32 [n_blocks] or, with double quantization, uint8 [n_blocks]
    weight.quant_map                       fp32 [16]                  the NF4 table
    weight.nested_absmax                   fp32 [ceil(n_blocks/256)]  (double quantization only)
    weight.nested_quant_map                fp32 [256]                 the dynamic map (double quantization only)
    weight.quant_state.bitsandbytes__nf4   uint8 bytes of a JSON object: quant_type, blocksize, dtype,
                                           shape (+ nested_blocksize, nested_dtype, nested_offset)

(``QuantState.as_dict(packed=True)`` in bitsandbytes). That is also the layout of the pre-quantized
"bnb-4bit" checkpoints on the Hugging Face hub, so ``from_bnb_state_dict`` is how those are loaded.
"""
import json
import math
from collections.abc import Mapping

import torch

from .checks import check_block_size, check_quantized_weight
from .codebook import NF4_CODE, dynamic_code
from .double_quant import NESTED_BLOCK_SIZE
from .quantized_weight import QuantizedWeight

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_QUANT_STATE = "quant_state.bitsandbytes__nf4"
_PLAIN = ("absmax", "quant_map", _QUANT_STATE)
_NESTED = ("nested_absmax", "nested_quant_map")


def to_bnb_state_dict(qw: QuantizedWeight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' ``Linear4bit`` holds for this weight (same keys, dtypes, shapes)."""
    check_quantized_weight(qw)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r} ({type(prefix).__name__})")
    meta = {"quant_type": "nf4", "blocksize": qw.block_size, "dtype": _DTYPE_NAMES[qw.dtype], "shape": list(qw.shape)}
    sd = {
        prefix: qw.packed.reshape(-1, 1),
        f"{prefix}.absmax": qw.absmax,
        f"{prefix}.quant_map": NF4_CODE.to(qw.device),
    }
    if qw.double_quant:
        sd[f"{prefix}.nested_absmax"] = qw.nested_absmax
        sd[f"{prefix}.nested_quant_map"] = dynamic_code().to(qw.device)
        meta.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset=qw.offset.item())
    sd[f"{prefix}.{_QUANT_STATE}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return sd


def from_bnb_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "weight") -> QuantizedWeight:
    """Read the NF4 weight stored under ``prefix`` in a bitsandbytes-format state dict.

    Every field is validated before use (keys, JSON quant state, dtypes, lengths, finiteness of the
    scales, the two code tables), so a malformed or truncated state dict is an error naming the field,
    never silently wrong weights.
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"sd must be a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r} ({type(prefix).__name__})")
    meta = _read_meta(sd, prefix)
    nested = "nested_offset" in meta
    expected = {prefix} | {f"{prefix}.{k}" for k in _PLAIN + (_NESTED if nested else ())}
    present = {k for k in sd if k == prefix or k.startswith(prefix + ".")}
    if expected - present:
        raise ValueError(f"state dict is missing {sorted(expected - present)} for the NF4 weight {prefix!r}")
    if present - expected:
        raise ValueError(f"state dict has unexpected keys {sorted(present - expected)} for the NF4 weight {prefix!r}")
    for key in expected:
        if not isinstance(sd[key], torch.Tensor):
            raise TypeError(f"{key} must be a torch.Tensor, got {type(sd[key]).__name__}")
    _check_table(sd[f"{prefix}.quant_map"], NF4_CODE, f"{prefix}.quant_map", "the NF4 table (only NF4 is supported)")
    if nested:
        _check_table(sd[f"{prefix}.nested_quant_map"], dynamic_code(), f"{prefix}.nested_quant_map",
                     "bitsandbytes' signed dynamic map")

    shape, block_size, dtype = torch.Size(meta["shape"]), meta["blocksize"], _DTYPES[meta["dtype"]]
    packed = sd[prefix].contiguous().view(torch.uint8).reshape(-1)  # any quant_storage dtype, as bytes
    absmax = sd[f"{prefix}.absmax"].reshape(-1)
    if packed.numel() != -(-shape.numel() // 2):
        raise ValueError(f"{prefix} holds {packed.numel()} bytes; shape {tuple(shape)} needs {-(-shape.numel() // 2)}")
    qw = QuantizedWeight(packed=packed, absmax=absmax, shape=shape, dtype=dtype, block_size=block_size)
    if nested:
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
        qw = qw.with_tensors(nested_absmax=sd[f"{prefix}.nested_absmax"].reshape(-1), offset=offset)
    check_quantized_weight(qw, f"state dict {prefix!r}")  # dtypes and lengths of absmax, nested_absmax
    scales = qw.nested_absmax if nested else qw.absmax
    if not torch.isfinite(scales).all() or (scales < 0).any():
        name = f"{prefix}.nested_absmax" if nested else f"{prefix}.absmax"
        raise ValueError(f"{name} must hold finite, non-negative scales; it has NaN, Inf or negative values")
    return qw


def _check_table(table: torch.Tensor, expected: torch.Tensor, name: str, what: str) -> None:
    if table.numel() != expected.numel() or not torch.equal(table.reshape(-1).float().cpu(), expected):
        raise ValueError(f"{name} is not {what}: {expected.numel()} fixed values expected, got shape {tuple(table.shape)}")


def _read_meta(sd: Mapping, prefix: str) -> dict:
    """The JSON quant state, each field checked (type and value)."""
    key = f"{prefix}.{_QUANT_STATE}"
    if key not in sd:
        others = sorted(k for k in sd if ".quant_state." in k and k.startswith(prefix + "."))
        hint = f" (found {others}: only NF4 is supported)" if others else ""
        raise ValueError(f"state dict has no {key!r}{hint}")
    raw = sd[key]
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"{key} must be a uint8 tensor of JSON bytes, got {getattr(raw, 'dtype', type(raw).__name__)}")
    try:
        meta = json.loads(bytes(raw.reshape(-1).cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{key} is not a JSON quant state: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(meta).__name__}")
    missing = {"quant_type", "blocksize", "dtype", "shape"} - set(meta)
    if missing:
        raise ValueError(f"{key} lacks {sorted(missing)}; got {meta}")
    if meta["quant_type"] != "nf4":
        raise ValueError(f"{key}: quant_type must be 'nf4' (only NF4 is supported), got {meta['quant_type']!r}")
    check_block_size(meta["blocksize"], f"{key}: blocksize")
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"{key}: dtype must be one of {sorted(_DTYPES)}, got {meta['dtype']!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise ValueError(f"{key}: shape must be a non-empty list of positive ints, got {shape!r}")
    if "nested_offset" in meta:
        offset = meta["nested_offset"]
        if type(offset) not in (int, float) or not math.isfinite(offset):
            raise ValueError(f"{key}: nested_offset must be a finite number, got {offset!r}")
        if meta.get("nested_blocksize") != NESTED_BLOCK_SIZE:
            raise ValueError(f"{key}: nested_blocksize must be {NESTED_BLOCK_SIZE}, got {meta.get('nested_blocksize')!r}")
        if meta.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"{key}: nested_dtype must be 'float32', got {meta.get('nested_dtype')!r}")
    return meta
