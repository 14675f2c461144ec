"""The three components of the recipe and their library twins, one small interface each.

    component  ours                       library twin                      chosen by
    quant      ``nf4.Linear4bit``         bitsandbytes ``Linear4bit``       ``QUANT[name](weight, dtype)``
    lora       ``lora.inject``            PEFT's LoRA layers                ``LORA[name](module, options)``
    shard      ``sharding.shard_model``   PyTorch FSDP2 ``fully_shard``     ``SHARDERS[name](...)``

* a quant twin is a function ``(weight, compute_dtype) -> nn.Module``: the frozen linear of one weight
  (``quant.py``; bitsandbytes' class in ``bnb_linear.py``, imported only when chosen);
* a LoRA twin is a function ``(module, options) -> wrapped module names``: LoRA around the targets
  (``adapters.py``);
* a sharder is a function that loads the decoder layers through a callback and shards them, returning a
  `TrainableModel` (``sharders.py``): forward, the optimizer's parameters, gradient clipping, the full
  trainable state for the adapter, this rank's local state for checkpoints.

The loop (``recipe/loop.py``), the adapter writer (``recipe/adapter.py``) and the checkpoints
(``recipe/checkpoint.py``) only see a `TrainableModel`: they never ask which twin built it.
"""
from .adapters import LORA, adapter_key, reset_lora_init
from .quant import QUANT, prequantized_linear
from .sharders import SHARDERS, TrainableModel

__all__ = ["QUANT", "LORA", "SHARDERS", "TrainableModel", "adapter_key", "prequantized_linear", "reset_lora_init"]
