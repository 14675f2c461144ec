"""python -m recipe.generate: continue a prompt with a Llama, base or fine-tuned, streaming the text.

    python -m recipe.generate --model llama/assets/tiny-llama --prompt "def main():" --max-new-tokens 80
    python -m recipe.generate --model DIR --adapter runs/x/adapter --quant nf4 --prompts prompts.txt

One process, no sharding: the checkpoint is streamed layer by layer (``llama.load_checkpoint``), each
linear quantized to NF4 as it arrives with ``--quant nf4`` (``nf4.Linear4bit``; a pre-quantized
bitsandbytes checkpoint is read as is), then the PEFT-format adapter is loaded unmerged
(``lora.load_adapter``: LoRA, rsLoRA or DoRA). Generation is ``llama.generate`` (KV cache).

A single ``--prompt`` streams its completion as it is produced; ``--prompts FILE`` (one prompt per
line) runs all of them as one left-padded batch and prints each completion. Then one line reports the
prompt (prefill) and decode speeds in tokens/s and the peak memory (the GPU's allocated peak, or the
process's resident peak on the CPU; ``--device cuda`` is written but not yet run on a GPU). Greedy by
default (``--temperature 0``). ``--chat``: each prompt is a user message, rendered in the chat template
the adapter was trained with (``recipe.train`` saves it beside the adapter), as training rendered its
conversations.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import llama
import lora
import nf4
from llama.cli import Parser, integer, number, run_command
from llama.pretrain import BUNDLED_MODEL
from llama.tokenizer import is_byte_tokenizer

from .device import DEVICES, device_peak_mib, reset_device_peak, resolve_device
from .export import DTYPES
from .instruct.corpus import chat_prompt
from .memory import peak_rss_bytes, reset_peak_rss
from .plan import ALL_LINEAR


def is_linear_weight(name: str) -> bool:
    """Whether ``name`` is the weight of one of a decoder layer's seven projections (``ALL_LINEAR``)."""
    return name.startswith("model.layers.") and name.rsplit(".", 2)[-2] in ALL_LINEAR


def load_model(model_dir, adapter=None, quant: str = "none", dtype=torch.float32, device="cpu") -> llama.Llama:
    """The Llama of ``model_dir`` in ``dtype`` on ``device``; linears in NF4 with ``quant="nf4"``
    (block 64, double quantization); the adapter in ``adapter`` (a PEFT directory) loaded unmerged."""
    if quant not in ("nf4", "none"):
        raise ValueError(f"--quant must be 'nf4' or 'none', got {quant!r}")
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig.from_hf(model_dir))

    def place(name, value):
        if isinstance(value, dict):  # a bitsandbytes pre-quantized 4-bit weight
            replacement = nf4.Linear4bit.from_bnb_state_dict(value, compute_dtype=dtype)
        elif quant == "nf4" and is_linear_weight(name):
            replacement = nf4.Linear4bit(nf4.quantize(value.to(device=device, dtype=dtype)), compute_dtype=dtype)
        else:
            return value.to(device=device, dtype=dtype)
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), child, replacement.to(device))
        return None

    llama.load_checkpoint(model, model_dir, on_tensor=place)
    if adapter is not None:
        lora.load_adapter(model, adapter)
        model.to(device)
    return model.eval()


def encode(tokenizer, text: str) -> list[int]:
    """A prompt's ids: BOS and the text (a Hugging Face tokenizer: what its post-processor adds), no EOS."""
    if is_byte_tokenizer(tokenizer):
        return tokenizer.encode(text)
    return tokenizer.encode(text).ids


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids))


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompt (one prompt per non-empty line)")
    return prompts


class Stream:
    """Prints one sequence's text as its tokens arrive (waiting while a UTF-8 character is incomplete)
    and times the first token (the end of prefill) and the last."""

    def __init__(self, tokenizer, show: bool):
        self.tokenizer, self.show, self.ids, self.printed = tokenizer, show, [], ""
        self.first = self.last = None

    def __call__(self, row: int, token: int) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        if not self.show:
            return
        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def parse_args(argv=None):
    p = Parser(prog="python -m recipe.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--adapter", type=Path, help="PEFT-format adapter directory, loaded unmerged")
    p.add_argument("--quant", choices=("nf4", "none"), default="none")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (its completion is streamed)")
    source.add_argument("--prompts", help="a file, one prompt per line (one left-padded batch)")
    p.add_argument("--chat", action="store_true", help="each prompt is a user message, rendered with the chat template "
                   "the adapter was trained with (its chat_template.jinja), else the checkpoint's, else chatml")
    p.add_argument("--max-new-tokens", type=integer(minimum=1), default=64)
    p.add_argument("--temperature", type=number(minimum=0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(above=0, maximum=1),
                   help="nucleus sampling: keep the most likely tokens up to this mass")
    p.add_argument("--top-k", type=integer(minimum=1))
    p.add_argument("--seed", type=integer(minimum=0), default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="auto: the GPU of this process when CUDA is visible, else the CPU")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sampling = llama.Sampling(args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device)
    prompts = read_prompts(args)
    model = load_model(args.model, args.adapter, args.quant, DTYPES[args.dtype], device)
    tokenizer = llama.load_tokenizer(args.model)
    ids = [chat_prompt(args.model, args.adapter, tokenizer, text) if args.chat else encode(tokenizer, text)
           for text in prompts]
    eos = model.config.eos_token_id
    stop_ids = list(eos) if isinstance(eos, tuple) else [] if eos is None else [eos]
    stream = Stream(tokenizer, show=len(prompts) == 1)
    if stream.show:
        print(prompts[0], end="", flush=True)
    reset_device_peak(device)
    reset_peak_rss()
    start = time.perf_counter()
    out = llama.generate(model, ids, args.max_new_tokens, sampling, stop_ids,
                         torch.Generator(device).manual_seed(args.seed), on_token=stream)
    if stream.show:
        print()
    for prompt, new in zip(prompts if not stream.show else [], out):
        print(f"{prompt}{decode(tokenizer, new)}\n---")
    decoded = sum(map(len, out)) - len(out)  # the first token of each sequence comes out of prefill
    prefill_s, decode_s = stream.first - start, max(stream.last - stream.first, 1e-9)
    peak_mib = device_peak_mib(device) or peak_rss_bytes() / 2**20
    report = {"prompt_tokens": sum(map(len, ids)), "prompt_tokens_per_s": sum(map(len, ids)) / prefill_s,
              "decode_tokens": decoded, "decode_tokens_per_s": decoded / decode_s if decoded else 0.0,
              "peak_mib": peak_mib, "completions": [decode(tokenizer, new) for new in out]}
    print(f"prompt: {report['prompt_tokens']} tokens, {report['prompt_tokens_per_s']:.1f} tokens/s | decode: "
          f"{decoded} tokens, {report['decode_tokens_per_s']:.1f} tokens/s | peak memory "
          f"{peak_mib:.0f} MiB ({'GPU allocated' if device.type == 'cuda' else 'process resident'})", file=sys.stderr)
    return report


if __name__ == "__main__":
    run_command(main)
