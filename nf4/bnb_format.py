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

import torch

from .codebook import NF4_CODE, dynamic_code
from .double_quant import NESTED_BLOCK_SIZE
from .quantize import SUPPORTED_DTYPES, check_block_size
from .quantized_weight import QuantizedWeight

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_QUANT_STATE = "quant_state.bitsandbytes__nf4"
_PLAIN = ("absmax", "quant_map", _QUANT_STATE)
_NESTED = ("nested_absmax", "nested_quant_map")


def to_bnb_state_dict(qw: QuantizedWeight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' ``Linear4bit`` holds for this weight (same keys, dtypes, shapes)."""
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


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedWeight:
    """Read the NF4 weight stored under ``prefix`` in a bitsandbytes-format state dict."""
    meta = _read_meta(sd, prefix)
    nested = "nested_offset" in meta
    expected = {prefix} | {f"{prefix}.{k}" for k in _PLAIN + (_NESTED if nested else ())}
    present = {k for k in sd if k == prefix or k.startswith(prefix + ".")}
    if expected - present:
        raise ValueError(f"state dict is missing {sorted(expected - present)} for the NF4 weight {prefix!r}")
    if present - expected:
        raise ValueError(f"state dict has unexpected keys {sorted(present - expected)} for the NF4 weight {prefix!r}")
    if not torch.equal(sd[f"{prefix}.quant_map"].float().cpu(), NF4_CODE):
        raise ValueError(f"{prefix}.quant_map is not the NF4 table (only NF4 is supported)")
    if nested and not torch.equal(sd[f"{prefix}.nested_quant_map"].float().cpu(), dynamic_code()):
        raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' signed dynamic map")
    if nested and meta.get("nested_blocksize") != NESTED_BLOCK_SIZE:
        raise ValueError(f"nested_blocksize must be {NESTED_BLOCK_SIZE}, got {meta.get('nested_blocksize')}")

    shape, block_size = torch.Size(meta["shape"]), meta["blocksize"]
    check_block_size(block_size)
    dtype = getattr(torch, str(meta["dtype"]), None)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {meta['dtype']!r} in {prefix}.{_QUANT_STATE}")
    packed = sd[prefix].contiguous().view(torch.uint8).reshape(-1)  # any quant_storage dtype, as bytes
    absmax = sd[f"{prefix}.absmax"].reshape(-1)
    n_blocks = -(-shape.numel() // block_size)
    if packed.numel() != -(-shape.numel() // 2):
        raise ValueError(f"{prefix} holds {packed.numel()} bytes; shape {tuple(shape)} needs {-(-shape.numel() // 2)}")
    if absmax.numel() != n_blocks:
        raise ValueError(f"{prefix}.absmax has {absmax.numel()} values; {n_blocks} blocks of {block_size} expected")
    qw = QuantizedWeight(packed=packed, absmax=absmax, shape=shape, dtype=dtype, block_size=block_size)
    if nested:
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
        qw = qw.with_tensors(nested_absmax=sd[f"{prefix}.nested_absmax"].reshape(-1).float(), offset=offset)
    return qw


def _read_meta(sd: dict, prefix: str) -> dict:
    key = f"{prefix}.{_QUANT_STATE}"
    if key not in sd:
        others = sorted(k for k in sd if ".quant_state." in k and k.startswith(prefix + "."))
        hint = f" (found {others}: only NF4 is supported)" if others else ""
        raise ValueError(f"state dict has no {key!r}{hint}")
    try:
        meta = json.loads(bytes(sd[key].cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{key} is not a JSON quant state: {err}") from err
    missing = {"quant_type", "blocksize", "dtype", "shape"} - set(meta)
    if missing or meta["quant_type"] != "nf4":
        raise ValueError(f"{key} must describe an nf4 weight with blocksize, dtype and shape; got {meta}")
    return meta
