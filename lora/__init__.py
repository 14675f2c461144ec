"""lora: LoRA / rsLoRA / DoRA adapters beside a frozen (possibly quantized) linear base, in pure PyTorch.

    layer.py         LoRALinear: y = base(x) + s * B(A(dropout(x))), DoRA option, merge/unmerge
    frozen.py        FrozenLinear: the base's autograd Function (no weight grad, nothing saved)
    base_weight.py   the duck-typed base contract: tensor weight, .dequantize(), or bitsandbytes 4-bit
    inject.py        inject / merge / unmerge / trainable_parameters / count_parameters
    adapter_io.py    save_adapter / load_adapter in PEFT's on-disk format
    atomic_files.py  write_files_atomically: a set of files all-or-nothing (temp directory, then renames)
    saved_tensors.py record what autograd saves for backward (tests, benchmark, chapter 4)

It never imports nf4 (or any sibling module): a base is anything linear-like (ARCHITECTURE.md).
"""
from .adapter_io import load_adapter, save_adapter
from .atomic_files import committed_directory, write_files_atomically
from .base_weight import dequantized_weight, is_linear_like, is_quantized
from .frozen import FrozenLinear, frozen_linear
from .inject import count_parameters, inject, lora_layers, merge, select_targets, trainable_parameters, unmerge
from .layer import LoRALinear, check_hyperparameters
from .saved_tensors import SavedTensor, activation_bytes, record_saved_tensors

__all__ = [
    "LoRALinear", "FrozenLinear", "frozen_linear", "inject", "select_targets", "lora_layers", "merge", "unmerge",
    "trainable_parameters", "count_parameters", "save_adapter", "load_adapter", "dequantized_weight",
    "is_linear_like", "is_quantized", "record_saved_tensors", "activation_bytes", "SavedTensor",
    "write_files_atomically", "committed_directory", "check_hyperparameters",
]
