"""python -m recipe.export: merge a LoRA adapter into its base and write a Hugging Face checkpoint.

    python -m recipe.export --model llama/assets/tiny-llama --adapter runs/x/adapter --out merged/ --dtype bf16

The result is a plain Llama checkpoint -- sharded safetensors, ``model.safetensors.index.json``,
``config.json`` and the base's tokenizer files -- that ``transformers.AutoModelForCausalLM``,
``llama.load_checkpoint`` and converters for other runtimes read without knowing about LoRA.

Each adapted weight becomes ``W + s B A`` (LoRA / rsLoRA) or ``m / ||W + s B A||_c * (W + s B A)``
(DoRA), computed in fp32 by ``lora.LoRALinear.merge`` -- what PEFT's ``merge_and_unload`` computes --
then cast to ``--dtype``. Streamed: the base is read one decoder layer at a time
(``llama.iter_checkpoint``, memory-mapped), each merged tensor is written straight into its shard
(``llama.hf_writer``) and dropped, and only the adapter stays resident: the peak is one weight matrix
and its fp32 merge temporaries, within the bound of two layers plus the embeddings (a 70B export fits
a 64 GB machine). The output directory appears all at once.

``--quant nf4``: the adapter was trained over an NF4 base, so the base is first rounded through NF4
(quantize, dequantize) and the update added to that dequantized base, as QLoRA users merge; a
bitsandbytes pre-quantized checkpoint is always dequantized. Either way the export says so.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

import llama
import lora
import nf4
from llama.checkpoint import stream_order
from llama.cli import Parser, run_command
from llama.hf_writer import StreamingWriter, atomic_directory


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """"5GB" -> 5 * 10**9 (KB/MB/GB are powers of 10 as in transformers, KiB/MiB/GiB of 2)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--max-shard-size must be a positive size such as 5GB or 500MiB, got {text!r}")
    return max(1, int(float(match.group(1)) * UNITS[match.group(2).upper()]))


def adapter_on_meta(config: llama.LlamaConfig, adapter_dir) -> llama.Llama:
    """The architecture on ``meta`` with the adapter loaded for real: only the LoRA tensors use memory."""
    with torch.device("meta"):
        model = llama.Llama(config)
    lora.load_adapter(model, adapter_dir)  # injects the file's targets (their tensors still on meta)
    for _, layer in lora.lora_layers(model):
        layer.lora_A.to_empty(device="cpu")
        layer.lora_B.to_empty(device="cpu")
        if layer.dora:
            layer.lora_magnitude_vector = nn.Parameter(torch.empty(layer.out_features), requires_grad=False)
    lora.load_adapter(model, adapter_dir)  # now the values land
    return model


def merged(layer: lora.LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s merge applied to the fp32 base ``weight`` (the layer's own base stays on meta)."""
    meta = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(weight, requires_grad=False)
    try:
        layer.merge()
        return layer.base_layer.weight.detach()
    finally:
        layer.base_layer.weight, layer.merged = meta, False


def base_weight(name: str, value, quant: str) -> torch.Tensor:
    """The base tensor in fp32: dequantized if stored 4-bit, rounded through NF4 with ``--quant nf4``."""
    if isinstance(value, dict):
        return nf4.from_bnb_state_dict(value, "weight").dequantize(torch.float32)
    if quant == "nf4" and name.startswith("model.layers.") and value.dim() == 2:
        return nf4.quantize(value.float()).dequantize(torch.float32)
    return value.float()


def export(model_dir, adapter_dir, out, dtype=torch.bfloat16, max_shard_bytes: int = 5 * 10**9,
           quant: str = "none", log=print) -> list[Path]:
    """Merge ``adapter_dir`` into ``model_dir``'s weights and write the checkpoint to ``out``."""
    if quant not in ("nf4", "none"):
        raise ValueError(f"--quant must be 'nf4' or 'none', got {quant!r}")
    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the --model directory; write the merged checkpoint elsewhere")
    config = llama.LlamaConfig.from_hf(model_dir)
    model = adapter_on_meta(config, adapter_dir)
    adapted = dict(lora.lora_layers(model))
    said_dequantized = False
    with atomic_directory(out) as tmp:
        writer = StreamingWriter(tmp, stream_order(config), dtype, max_shard_bytes)
        for _, tensors in llama.iter_checkpoint(model_dir, config):
            for name in list(tensors):
                value = tensors.pop(name)  # dropped once written: its mapped pages are released
                if (isinstance(value, dict) or quant == "nf4") and not said_dequantized:
                    log("the base is 4-bit (NF4): exporting the dequantized base plus the merged update")
                    said_dequantized = True
                weight = base_weight(name, value, quant)
                layer = adapted.get(name.removesuffix(".weight"))
                writer.write(name, weight if layer is None else merged(layer, weight))
                del value, weight
        files = writer.finish(config.to_hf())
        for file in TOKENIZER_FILES:
            if (model_dir / file).is_file():
                shutil.copy2(model_dir / file, tmp / file)
    log(f"wrote {out}: {len(files)} safetensors file(s), {writer.total_bytes / 1e9:.2f} GB in "
        f"{str(dtype).removeprefix('torch.')}, {len(adapted)} merged linears")
    return [out / f.name for f in files]


def main(argv=None) -> list[Path]:
    p = Parser(prog="python -m recipe.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="base checkpoint directory")
    p.add_argument("--adapter", type=Path, required=True, help="PEFT-format adapter directory")
    p.add_argument("--out", type=Path, required=True, help="the merged checkpoint directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--quant", choices=("nf4", "none"), default="none",
                   help="nf4: the adapter was trained over an NF4 base; merge into the dequantized NF4 base")
    args = p.parse_args(argv)
    max_shard_bytes = parse_size(args.max_shard_size)
    return export(args.model, args.adapter, args.out, DTYPES[args.dtype], max_shard_bytes, args.quant,
                  log=lambda message: print(message, file=sys.stderr))


if __name__ == "__main__":
    run_command(main)
