"""nf4: 4-bit NormalFloat quantization with double quantization (QLoRA, Dettmers et al. 2023, section 3).

The algorithm in its plain form: ``nf4/reference.py`` (read it first); the public functions run the
fast path (``nf4/fast_path.py``), tested bit for bit against it. Bit-exact with bitsandbytes'
``quantize_4bit(..., quant_type="nf4")`` on CPU; on CUDA tensors it follows the rounding of bitsandbytes'
CUDA kernel (``nf4/rounding.py``; not yet verified on a GPU). Loadable both ways through its ``Linear4bit``
state-dict format; one fused Triton kernel for dequantization on the GPU.

    qw = nf4.quantize(w, block_size=64, double_quant=True)   # -> nf4.QuantizedWeight
    w_hat = qw.dequantize()                                  # same shape and dtype as w
    layer = nf4.Linear4bit.from_linear(torch.nn.Linear(4096, 4096))
"""
from .bnb_format import from_bnb_state_dict, to_bnb_state_dict
from .codebook import NF4_CODE, dynamic_code, nf4_code_from_normal
from .dequantize import dequantize
from .linear import Linear4bit
from .quantize import SUPPORTED_BLOCK_SIZES, quantize
from .quantized_weight import QuantizedWeight
from .reference import dequantize_reference, quantize_reference

__all__ = [
    "NF4_CODE", "nf4_code_from_normal", "dynamic_code", "quantize", "dequantize", "QuantizedWeight",
    "SUPPORTED_BLOCK_SIZES", "to_bnb_state_dict", "from_bnb_state_dict", "Linear4bit",
    "quantize_reference", "dequantize_reference",
]
