"""What does autograd keep for backward? List it with ``torch.autograd.graph.saved_tensors_hooks``.

Every tensor an autograd node saves passes through the pack hook, so recording there lists exactly
what a forward pass keeps alive until backward. A tensor saved twice (or two views of one storage) is
one allocation, so it is listed once. A saved parameter or buffer of the model is a reference to memory
that exists anyway: it is marked ``is_parameter`` and `activation_bytes` leaves it out.
"""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SavedTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    is_parameter: bool

    def __str__(self) -> str:
        kind = "parameter (no new memory)" if self.is_parameter else "activation"
        return f"{str(list(self.shape)):>16} {str(self.dtype):>15} {self.nbytes:>12,} B  {kind}"


def record_saved_tensors(fn, *args, module: nn.Module | None = None, **kwargs):
    """Run ``fn(*args, **kwargs)`` and return ``(output, [SavedTensor, ...])`` for what autograd saved.

    ``module``: its parameters and buffers are marked ``is_parameter`` when saved.
    """
    if not callable(fn):
        raise TypeError(f"record_saved_tensors: fn must be callable; got {type(fn).__name__}")
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"record_saved_tensors: module must be an nn.Module or None; got {type(module).__name__}")
    known = set()
    if module is not None:
        known = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen, records = set(), []

    def pack(tensor):
        storage = tensor.untyped_storage().data_ptr()
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key not in seen:
            seen.add(key)
            records.append(SavedTensor(tuple(tensor.shape), tensor.dtype,
                                       tensor.numel() * tensor.element_size(), storage in known))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn(*args, **kwargs)
    return output, records


def activation_bytes(records: list[SavedTensor]) -> int:
    """Bytes of the saved tensors that are new allocations (not the model's own parameters)."""
    if not all(isinstance(r, SavedTensor) for r in records):
        raise TypeError("activation_bytes: records must be the SavedTensor list of record_saved_tensors")
    return sum(r.nbytes for r in records if not r.is_parameter)
