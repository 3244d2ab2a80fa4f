#!/usr/bin/env bash
# On a machine with a CUDA GPU: install attnkit with a CUDA build of torch, run the GPU tests,
# calibrate auto for the GPU, and time auto vs SDPA vs Flex on a short grid (dense, causal,
# window, documents; T = 4k-32k after a verifying 1k; bfloat16), forward and forward+backward.
# Usage: scripts/gpu_check.sh [venv-dir]   (reuses the venv if it exists; its torch must be a
# CUDA build: the CPU pin of constraints.txt is not applied here)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-gpu}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/pip" install -q torch
"$venv/bin/pip" install -q -e '.[dev]'
"$venv/bin/python" -c "
import torch
assert torch.cuda.is_available(), 'no CUDA device: torch.cuda.is_available() is False'
from attnkit import machine
print(machine.capabilities('cuda').describe(), '| torch', torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$venv/bin/pytest" -q -m cuda tests/test_cuda.py
"$venv/bin/attnkit" calibrate --device cuda
grid=(--device cuda --mechanisms softmax,causal,sliding_window,documents
      --lengths 1024,4096,8192,16384,32768 --dtypes bfloat16)  # 1024: verified there first
"$venv/bin/attnkit" bench "${grid[@]}" --out bench-out/gpu
"$venv/bin/attnkit" bench "${grid[@]}" --backward --out bench-out/gpu-backward
