"""Argument checks shared by the public functions of nf4: each error names the argument, its value, and
what is expected. Only shapes, dtypes and devices are checked here (no host sync): finiteness is
checked where data enters (``quantize``, ``from_bnb_state_dict``)."""
import torch

from .double_quant import NESTED_BLOCK_SIZE
from .quantized_weight import QuantizedWeight

SUPPORTED_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_block_size(block_size, name: str = "block_size") -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"{name} must be an int, got {block_size!r} ({type(block_size).__name__})")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES} (what bitsandbytes accepts), got {block_size}")


def check_dtype(dtype, name: str = "dtype") -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_weight(w, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    check_dtype(w.dtype, f"{name}.dtype")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}): nothing to quantize")


def _check_tensor(t, name: str, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} values (shape {tuple(t.shape)}); {numel} expected")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the packed codes on {device}: all must be on one device")


def check_quantized_weight(qw, name: str = "qw") -> None:
    """Every field of a QuantizedWeight consistent with its shape and block size (sizes, dtypes, devices)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{name} must be an nf4.QuantizedWeight, got {type(qw).__name__}")
    if not isinstance(qw.shape, torch.Size):
        raise TypeError(f"{name}.shape must be a torch.Size, got {qw.shape!r}")
    if qw.shape.numel() == 0:
        raise ValueError(f"{name}.shape {tuple(qw.shape)} holds no values")
    check_dtype(qw.dtype, f"{name}.dtype")
    check_block_size(qw.block_size, f"{name}.block_size")
    if not isinstance(qw.packed, torch.Tensor):
        raise TypeError(f"{name}.packed must be a torch.Tensor, got {type(qw.packed).__name__}")
    n, device = qw.shape.numel(), qw.packed.device
    n_blocks = -(-n // qw.block_size)
    _check_tensor(qw.packed, f"{name}.packed", torch.uint8, -(-n // 2), device)
    if (qw.nested_absmax is None) != (qw.offset is None):
        raise ValueError(f"{name}: nested_absmax and offset go together (double quantization), got one of them")
    if qw.nested_absmax is None:
        _check_tensor(qw.absmax, f"{name}.absmax", torch.float32, n_blocks, device)
    else:
        _check_tensor(qw.absmax, f"{name}.absmax (8-bit codes)", torch.uint8, n_blocks, device)
        n_nested = -(-n_blocks // NESTED_BLOCK_SIZE)
        _check_tensor(qw.nested_absmax, f"{name}.nested_absmax", torch.float32, n_nested, device)
        _check_tensor(qw.offset, f"{name}.offset", torch.float32, 1, device)


def check_out(out, qw: QuantizedWeight, dtype: torch.dtype) -> None:
    """``out=`` of dequantize: a contiguous tensor of qw's shape (or its numel, flat), dtype and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}; dequantizing to {dtype}")
    if out.shape not in (qw.shape, torch.Size([qw.numel])):
        raise ValueError(f"out has shape {tuple(out.shape)}; {tuple(qw.shape)} (or ({qw.numel},)) expected")
    if out.device != qw.device or not out.is_contiguous():
        raise ValueError(f"out must be contiguous and on {qw.device}, got {out.device}, contiguous={out.is_contiguous()}")
