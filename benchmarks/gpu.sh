#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one command that fits a 10-minute session (each step has its own
# timeout, 560 s in all at most; a step that fails or times out is reported and the next one runs):
#  1. NF4: quantize and dequantize (into out= and allocating) of a 4096 x 14336 bf16 weight, ours (Triton)
#     vs bitsandbytes' CUDA kernels, the bandwidth of each next to the card's device copy, and the bytes of
#     every stored tensor (NF4 codes, double-quant 8-bit absmax codes, nested absmax, offset), ours quantized
#     with the CUDA rounding rule (nf4/rounding.py), compared with bitsandbytes' CUDA kernel.
#  2. The QLoRA linear: ours over nf4 / over bitsandbytes, PEFT over bitsandbytes, full fine-tuning.
#  3. The main job on the GPU(s), recipe.train, without and with --offload (pinned arena, copy stream).
#  4. End to end: ours vs transformers + bitsandbytes + PEFT + FSDP2, same model, data and settings.
#  5. The planner against the GPU: planned vs measured peak per phase at Llama-2-70B width truncated to 2
#     layers, at the reference run's batch (2 x 2048 tokens, r=64, checkpointing, bf16: activations
#     dominate), then the step-time model's prediction for a GPU of its datasheet table, and the published
#     70B runs beside it with the host overhead it leaves hidden behind the GPUs' work.
# NCCL wants one GPU per rank: 2 ranks on a 2-GPU box, 1 on a 1-GPU box. Run from the repository root with
# no install; it needs torch with CUDA, triton, transformers, peft and bitsandbytes (a CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to measure." >&2
    exit 1
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
ranks=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
out=$(mktemp -d)
failed=()
step() {  # step SECONDS NAME COMMAND...: run it with a timeout, note a failure, go on
    local seconds=$1 name=$2
    shift 2
    echo; echo "=== $name ($seconds s at most)"
    timeout "$seconds" "$@" || { echo "=== $name: FAILED (exit $?)"; failed+=("$name"); }
}
train() { torchrun --standalone --nproc_per_node "$ranks" -m recipe.train --device cuda --steps 30 --no-progress "$@"; }
step 60 "nf4 kernels; NF4 and 8-bit absmax bytes vs bitsandbytes CUDA (cuda rounding rule)" python -m benchmarks.nf4 --device cuda --repeats 5
step 45 "QLoRA linear vs PEFT" python -m benchmarks.lora --device cuda
step 75 "recipe.train" train --out "$out/train"
step 75 "recipe.train --offload" train --offload --out "$out/offload"
step 120 "end to end vs the library stack" python -m benchmarks.e2e --device cuda --ranks "$ranks" --steps 60
step 180 "planner vs the GPU's peak, 70B width" python -m recipe.measure --device cuda --nproc "$ranks" \
    --preset llama-2-70b --layers 2 --steps 2 --seq-len 2048 --batch-size 2 --rank 64 --activation-checkpointing --dtype bf16
step 5 "step-time model, datasheet GPUs" python -m recipe.plan llama-2-70b --world-size 2 --batch-size 2 --seq-len 2048 \
    --rank 64 --offload --gpu h100 --published
rm -rf "$out"
echo; echo "=== failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
