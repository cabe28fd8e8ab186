#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (see the device tool): the kernel tests on the
# GPU without Triton's interpreter, benchmarks.gpu, then the suite's GPU-sized cases with
# the compiled columns. Every step has its own time limit and runs even if one before it
# failed. The machine's image has its own PyTorch (not necessarily the pinned one) and no
# registry: torch_fwd is used from the checkout (PYTHONPATH), the backend's entry point
# registered by a no-deps editable install where setuptools allows it.
# Usage: OUT=... bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  timeout 60 $PY -m pip install --no-deps --no-build-isolation --no-index -q -e . 2>&1 | tail -3
  $PY -c "import torch_fwd; print('torch_fwd imports')" 2>&1 | tail -3
} > "$OUT/gpu_env.txt" 2>&1
timeout 170 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py > "$OUT/gpu_kernel_tests.txt" 2>&1
echo "exit $?" >> "$OUT/gpu_kernel_tests.txt"
timeout 150 $PY -m benchmarks.gpu --out "$OUT" > "$OUT/gpu_bench.txt" 2>&1
echo "exit $?" >> "$OUT/gpu_bench.txt"
timeout 200 $PY -m benchmarks --device cuda --rounds 3 --no-jacobian --out "$OUT" \
  --cases sin_cos_exp_1e6_f32,gelu_mlp_4x1024_f32,transformer_block_f32 > "$OUT/suite_cuda.txt" 2>&1
echo "exit $?" >> "$OUT/suite_cuda.txt"
rm -f "$OUT/suite.png"
ls -la "$OUT"
