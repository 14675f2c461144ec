"""QuantizedWeight: an NF4 tensor as a handful of plain tensors plus its shape, dtype and block size."""
from dataclasses import dataclass, fields

import torch


@dataclass
class QuantizedWeight:
    """The storage of one NF4-quantized tensor (the layout of bitsandbytes' ``quantize_4bit``).

    packed:        uint8[ceil(numel / 2)], two 4-bit codes per byte, the FIRST element in the HIGH nibble.
    absmax:        one scale per block of ``block_size`` elements of the flattened tensor:
                   fp32 without double quantization, uint8 codes of the dynamic map with it.
    nested_absmax: fp32[ceil(n_blocks / 256)], the second-level scales (double quantization only).
    offset:        fp32 0-dim tensor, the mean subtracted from the absmax values (double quantization only).
    shape, dtype:  of the original tensor; ``dequantize()`` returns this shape and, by default, dtype.

    Only plain tensors, so a module can register them as buffers/frozen parameters and a sharding
    layer can move, flatten and gather them without knowing what they mean. ``tensors()`` and
    ``with_tensors()`` convert to and from a dict of those tensors.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    TENSOR_NAMES = ("packed", "absmax", "nested_absmax", "offset")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Storage bytes of the quantized tensor (codes + every level of scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The plain tensors, by name (``nested_absmax``/``offset`` only with double quantization)."""
        named = {name: getattr(self, name) for name in self.TENSOR_NAMES}
        return {name: t for name, t in named.items() if t is not None}

    def with_tensors(self, **tensors: torch.Tensor) -> "QuantizedWeight":
        """The same weight over other tensors (e.g. a module's current, possibly re-gathered, ones)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(tensors)
        return QuantizedWeight(**values)

    def to(self, device) -> "QuantizedWeight":
        """The same weight with every tensor on ``device``."""
        return self.with_tensors(**{name: t.to(device) for name, t in self.tensors().items()})

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto", out: torch.Tensor | None = None):
        """The fp tensor back, in ``dtype`` (default: the original dtype); see ``nf4.dequantize``."""
        from .dequantize import dequantize

        return dequantize(self, dtype=dtype, backend=backend, out=out)
