"""QLoRA linear layer, side by side: forward+backward time and what autograd saves, in one run.

    python -m benchmarks.lora [--tokens 2048] [--features 4096] [--rank 16] [--repeats 5] [--threads N] [--device cuda]
    python -m benchmarks.lora --quick      # tiny sizes, seconds: checks that every variant still runs

One 4096x4096 base, 2048 tokens, LoRA rank 16, bf16 compute and bf16 adapters, input requiring grad:

  (a) ours: lora.LoRALinear over nf4.Linear4bit
  (b) ours: lora.LoRALinear over bitsandbytes Linear4bit (NF4, double quant, block 64)
  (c) PEFT's LoRA over bitsandbytes Linear4bit (PEFT's own bnb layer) -- the reference for the ratios
  (d) plain nn.Linear full fine-tuning (bf16 weight with a gradient)

Time: one forward+backward, repeated ``--repeats`` times after one warm-up, the variants interleaved in
each repeat, each repeat starting at the next variant (so a noisy neighbour slows all of them alike); the fastest and the median are shown, the
ratios use the fastest (the least disturbed run, as ``timeit`` advises on a shared machine). On the CPU the
process's CPU time (``time.process_time``, all its threads) is shown too, as the median: it counts the work
done, not the time spent waiting for a core, so it is the steadier number when other jobs load the
machine. Saved: the bytes autograd keeps between
forward and backward that are new allocations (`lora.activation_bytes`; a saved reference to a model
parameter costs nothing and is left out). Targets: (a) and (b) time <= 1.0x (c), saved bytes <= (c).
(a) and (b) differ only in the base's dequantization (nf4 vs bitsandbytes); (b) and (c) only in the LoRA
layer around the same bitsandbytes base.
"""
import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import lora
from llama.cli import Parser, integer, run_command
from recipe.twins.bnb_linear import bnb_linear4bit

from . import timed


def ours_over_nf4(linear, rank):
    try:
        from nf4 import Linear4bit
    except ImportError as err:
        return None, f"nf4.Linear4bit not available ({err})"
    return lora.LoRALinear(Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16), r=rank, alpha=2 * rank,
                           dtype=torch.bfloat16), None


def ours_over_bnb(linear, rank):
    return lora.LoRALinear(bnb_linear4bit(linear), r=rank, alpha=2 * rank, dtype=torch.bfloat16), None


def peft_over_bnb(linear, rank):
    import peft

    model = nn.Sequential()
    model.add_module("proj", bnb_linear4bit(linear))
    model.is_loaded_in_4bit = True  # as from_pretrained(load_in_4bit=True): PEFT picks its bnb LoRA layer
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]),
                                autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    layer.lora_A.to(torch.bfloat16), layer.lora_B.to(torch.bfloat16)
    return model, None


def full_finetuning(linear, rank):
    return copy.deepcopy(linear).requires_grad_(True), None


VARIANTS = {
    "(a) ours over nf4.Linear4bit": ours_over_nf4,
    "(b) ours over bnb Linear4bit": ours_over_bnb,
    "(c) PEFT over bnb Linear4bit": peft_over_bnb,
    "(d) nn.Linear, full fine-tune": full_finetuning,
}
REFERENCE = "(c) PEFT over bnb Linear4bit"


def forward_backward(module, x, grad_out) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward+backward."""
    cpu = time.process_time()
    elapsed = timed(lambda: module(x).backward(grad_out), x.device)
    cpu = time.process_time() - cpu
    x.grad = None
    module.zero_grad(set_to_none=True)
    return elapsed, cpu


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(prog="python -m benchmarks.lora", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=integer(minimum=1), default=2048)
    parser.add_argument("--features", type=integer(minimum=1), default=4096, help="a multiple of 64 (the NF4 block)")
    parser.add_argument("--rank", type=integer(minimum=1), default=16)
    parser.add_argument("--repeats", type=integer(minimum=1), default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=integer(minimum=1), default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="64 tokens, 256 features, rank 4, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.features, args.rank, args.repeats = 64, 256, 4, 2
    if args.features % 64:
        parser.error(f"argument --features: expected a multiple of 64 (the NF4 block size), got {args.features}")
    if args.rank > args.features:
        parser.error(f"argument --rank: expected at most --features ({args.features}), got {args.rank}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but no CUDA GPU is visible to torch")
    return args


def _ms(seconds: float) -> str:
    """Milliseconds with at least three significant digits (a GPU step takes about one millisecond)."""
    ms = 1e3 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    linear = nn.Linear(args.features, args.features, bias=False).to(device, torch.bfloat16)
    x = torch.randn(args.tokens, args.features, dtype=torch.bfloat16, device=device, requires_grad=True)
    grad_out = torch.randn(args.tokens, args.features, dtype=torch.bfloat16, device=device)

    modules, notes = {}, {}
    for name, build in VARIANTS.items():
        module, note = build(linear, args.rank)
        if module is None:
            notes[name] = note
            continue
        modules[name] = module
        with torch.no_grad():  # a trained adapter: B != 0 (ours and PEFT's share the name lora_B)
            for parameter_name, parameter in module.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.01)

    saved = {}
    for name, module in modules.items():
        output, records = lora.record_saved_tensors(module, x, module=module)
        output.backward(grad_out)
        saved[name] = records
        forward_backward(module, x, grad_out)  # warm-up
    times, order = {name: [] for name in modules}, list(modules)
    for repeat in range(args.repeats):  # each repeat starts at another variant: none always runs first
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            times[name].append(forward_backward(modules[name], x, grad_out))

    wall = {name: [w for w, _ in runs] for name, runs in times.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in times.items()}
    ref_time = min(wall[REFERENCE]) if REFERENCE in wall else float("nan")
    ref_cpu = cpu.get(REFERENCE, float("nan"))
    ref_bytes = lora.activation_bytes(saved[REFERENCE]) if REFERENCE in saved else float("nan")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"QLoRA linear {args.features}x{args.features}, {args.tokens} tokens, r={args.rank}, bf16 compute, "
          f"torch {torch.__version__}, {where}, {args.repeats} repeats")
    print()
    print("| variant | fwd+bwd ms, min (median) | time vs (c) | CPU ms, median | CPU vs (c) | saved activations MiB | "
          "saved vs (c) | saved tensors (activation / param ref) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in VARIANTS:
        if name in notes:
            print(f"| {name} | n/a | | | | | | {notes[name]} |")
            continue
        fastest, median = min(wall[name]), statistics.median(wall[name])
        nbytes = lora.activation_bytes(saved[name])
        n_act = sum(not r.is_parameter for r in saved[name])
        print(f"| {name} | {_ms(fastest)} ({_ms(median)}) | {fastest / ref_time:.2f}x | {_ms(cpu[name])} | "
              f"{cpu[name] / ref_cpu:.2f}x | {nbytes / 2**20:.2f} | "
              f"{nbytes / ref_bytes:.2f}x | {n_act} / {len(saved[name]) - n_act} |")
    print()
    print("Each step dequantizes the base weight twice (forward, and again in backward). One dequantization, "
          "fastest of the repeats:")
    for name, module in modules.items():
        if isinstance(module, lora.LoRALinear):
            fastest = min(timed(lambda: lora.dequantized_weight(module.base_layer, torch.bfloat16), device)
                          for _ in range(args.repeats))
            print(f"    {name}: {1e3 * fastest:.2f} ms")
    print()
    for name, records in saved.items():
        print(f"{name}: saved for backward")
        print(*(f"    {r}" for r in records), sep="\n")


if __name__ == "__main__":
    run_command(main)
