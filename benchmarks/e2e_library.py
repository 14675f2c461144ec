"""The library side of ``benchmarks/e2e.py``: one rank of transformers + bitsandbytes 4-bit + PEFT + FSDP2.

    torchrun --nproc_per_node 2 -m benchmarks.e2e_library [recipe.train's flags]

``LlamaForCausalLM`` loaded 4-bit by bitsandbytes (NF4, double quantization, the packed bytes stored as
the compute dtype -- the FSDP "quant_storage" trick), PEFT's ``get_peft_model``, PyTorch FSDP2
``fully_shard`` per decoder layer and at the root. It is trained by the recipe's own job
(``recipe.job.run_job`` with this file's `build_library` as the builder): the same data, sampler, LoRA
initialisation, loop, schedule, clipping, evaluation and timing as ``python -m recipe.train``, so the
only difference between the two sides is the model stack.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from llama.cli import run_command
from recipe.build import BuildOptions, Built
from recipe.device import close_distributed, device_peak_mib, init_distributed, reset_device_peak, resolve_device
from recipe.job import run_job
from recipe.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from recipe.train import job_config, parse_args
from recipe.twins import adapter_key, reset_lora_init
from recipe.twins.sharders import Fsdp2Sharded


def hf_inputs(inputs: dict) -> dict:
    """Our keyword arguments as transformers takes them: the (batch, q, kv) bool mask of packed or
    padded rows (True = may attend) as a 4-D (batch, 1, q, kv) mask, which transformers uses as given."""
    mask = inputs.get("attention_mask")
    return inputs if mask is None or mask.dim() != 3 else {**inputs, "attention_mask": mask[:, None]}


class HfFsdp2(Fsdp2Sharded):
    """A Hugging Face causal LM under FSDP2: its output object read as (logits, loss)."""

    def forward(self, input_ids, **inputs):
        out = self.model(input_ids=input_ids, **hf_inputs(inputs))
        return out.logits, out.loss


def build_library(opts: BuildOptions) -> Built:
    """The library stack for ``opts`` (its model, LoRA rank/alpha/targets, seed, dtype, device)."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    rss_before = current_rss_bytes()
    reset_peak_rss()
    reset_device_peak(opts.device)
    dtype = opts.compute_dtype
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = LlamaForCausalLM.from_pretrained(str(opts.model), quantization_config=quant, dtype=dtype,
                                             device_map={"": str(opts.device)})
    for module in model.modules():  # bitsandbytes' CPU eval path repacks the bytes in place, after which
        if hasattr(module, "support_avx512bf16_for_cpu"):  # backward no longer reaches the input: keep it off
            module.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                                             target_modules=list(opts.target_modules)))
    reset_lora_init(model, opts.seed)
    mesh = init_device_mesh(opts.device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    names = [adapter_key(n) for n, m in model.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A")]
    return Built(HfFsdp2(model), names, opts.device, peak_rss_bytes(), rss_before, device_peak_mib(opts.device),
                 f"bitsandbytes 4-bit base, PEFT LoRA (r={opts.rank}, {len(names)} layers), FSDP2 sharding")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    init_distributed(device)
    try:
        return run_job(job_config(args, device), builder=build_library)
    finally:
        close_distributed()


if __name__ == "__main__":
    run_command(main)
