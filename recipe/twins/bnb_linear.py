"""bitsandbytes' NF4 ``Linear4bit``, made from an ``nn.Linear``, in a form a sharder can slice.

Imported only when ``--quant bnb`` asks for it (and by the tests and benchmarks that compare against
bitsandbytes): it imports bitsandbytes at the top.
"""
from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn


class ShardableLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes ``Linear4bit`` whose packed weight may be replaced by a plain uint8 view (what a sharder
    does): reading ``.weight`` re-attaches the module's ``QuantState`` to it -- what bitsandbytes' own
    ``fix_4bit_weight_quant_state_from_module`` does for FSDP -- without re-registering a Parameter the
    sharder would then fail to overwrite."""

    @property
    def weight(self):
        try:
            w = nn.Module.__getattr__(self, "weight")  # the registered Params4bit, while there is one
        except AttributeError:
            w = self.__dict__.get("_sharded_weight")  # the sharder's view (see the setter)
        if w is None:
            raise AttributeError("weight")
        if getattr(w, "quant_state", None) is None and getattr(self, "quant_state", None) is not None:
            w.quant_state = self.quant_state
        return w

    @weight.setter
    def weight(self, value):
        # Reached only for a value nn.Module does not register itself (a Parameter is registered by
        # nn.Module.__setattr__): the plain tensor a sharder puts in place of the packed bytes.
        self.__dict__["_sharded_weight"] = value


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16, block_size: int = 64) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` (double quantization) holding ``linear``'s weight (and bias),
    quantized on the weight's device -- the counterpart of ``nf4.Linear4bit.from_linear``."""
    with torch.device("meta"):
        module = ShardableLinear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                     compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    weight = linear.weight.detach()
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=block_size,
                                      compress_statistics=True, quant_type="nf4", module=module)
    module.weight = module.weight.to(weight.device)  # Params4bit quantizes when moved to a device
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    module.support_avx512bf16_for_cpu = False  # never repack the bytes in place at eval time
    return module
