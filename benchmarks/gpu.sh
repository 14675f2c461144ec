#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one command (each step has its own timeout: 570 s in all at most):
#  1. NF4: our Triton dequant kernel vs bitsandbytes' CUDA kernels on a 4096 x 14336 bf16 weight, with the
#     bandwidth each achieves next to the card's device-to-device copy bandwidth.
#  2. The QLoRA linear: ours over nf4 / over bitsandbytes, PEFT over bitsandbytes, full fine-tuning.
#  3. End to end on the GPU(s): ours (recipe.train) vs transformers + bitsandbytes + PEFT + FSDP2, same
#     bundled model, data and hyper-parameters (NCCL wants one GPU per rank: 2 ranks, or 1 on a 1-GPU box).
#  4. The planner against the GPU's own peak (torch.cuda.max_memory_allocated): a Llama-2-70B-width model
#     truncated to 2 layers, trained at the reference run's batch (2 x 2048 tokens, r=64, checkpointing, bf16).
# Run from the repository root with no install (the packages import from there). It needs torch with CUDA,
# triton, transformers, peft and bitsandbytes (a CUDA build) importable by `python`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to measure." >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
ranks=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
timeout 90 python -m benchmarks.nf4 --device cuda --repeats 5
timeout 60 python -m benchmarks.lora --device cuda
timeout 180 python -m benchmarks.e2e --device cuda --ranks "$ranks" --steps 60
timeout 240 python -m recipe.measure --device cuda --nproc "$ranks" --preset llama-2-70b --layers 2 --steps 2 \
    --seq-len 2048 --batch-size 2 --rank 64 --activation-checkpointing --dtype bf16
