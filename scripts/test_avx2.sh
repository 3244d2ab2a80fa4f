#!/usr/bin/env bash
# Run the backend, kernel, linear and integration tests on the AVX2 code paths, on any x86 CPU:
# ATen's vector code, inductor's generated C++ (FlexAttention) and attnkit's compiled kernels
# are built for AVX2 (ATEN_CPU_CAPABILITY), oneDNN's matmuls and brgemm kernels are capped at
# AVX2 (ONEDNN_MAX_CPU_ISA), so bfloat16 matmuls are emulated as on a CPU without AVX512-BF16.
# Inductor keeps these kernels in their own cache, apart from the native ones.
# Usage: scripts/test_avx2.sh [venv-dir] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/attnkit-inductor-avx2"
"$venv/bin/python" -c "
import torch
from attnkit import machine
caps = machine.capabilities()
assert caps.isa == 'AVX2' and not caps.flags & {'avx512f', 'avx512_bf16'}, caps.describe()
print('forced:', caps.describe())"
"$venv/bin/pytest" -q -m "not slow" tests/backends tests/linear tests/integrations \
    tests/test_masks.py tests/test_dispatch.py tests/test_machine.py "$@"
