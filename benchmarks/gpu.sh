#!/usr/bin/env bash
# The GPU part of the NF4 benchmark (a few minutes at most): our Triton dequant kernel vs bitsandbytes'
# CUDA kernels on a 4096 x 14336 bf16 weight, with the bandwidth each achieves next to the card's
# device-to-device copy bandwidth (bytes moved: the NF4 storage read + the bf16 output written).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to measure." >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 python -m benchmarks.nf4 --device cuda --repeats 5
