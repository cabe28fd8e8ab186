#!/usr/bin/env bash
# The prepared run for a lent GPU machine (see the device tool). Steps, each with its own
# time limit and run even if one before it failed (STEPS picks, comma-separated):
#   env      the card, versions, and whether torch_fwd imports
#   tests    the kernel tests on the GPU, without Triton's interpreter
#   profile  benchmarks.gpu_profile: synchronising calls, cProfile and torch.profiler per path
#   kernels  benchmarks.gpu (GPU_SECTIONS: bandwidth, attention, crossover)
#   suite    the suite's GPU-sized cases (SUITE_CASES), compiled columns included
# The machine's image has its own PyTorch (not necessarily the pinned one) and no registry:
# torch_fwd is used from the checkout (PYTHONPATH).
# Usage: OUT=... [STEPS=...] bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
STEPS=${STEPS:-env,tests,profile,kernels,suite}
GPU_SECTIONS=${GPU_SECTIONS:-bandwidth,attention,crossover}
SUITE_CASES=${SUITE_CASES:-sin_cos_exp_1e6_f32,gelu_mlp_4x1024_f32,transformer_block_f32}
SUITE_ROUNDS=${SUITE_ROUNDS:-2}
SUITE_COMPILE_ROUNDS=${SUITE_COMPILE_ROUNDS:-1}  # (each compile repeated costs minutes of a short lease)
SUITE_TIMEOUT=${SUITE_TIMEOUT:-220}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { [[ ",$STEPS," == *",$1,"* ]]; }
if step env; then
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
    $PY -c "import torch_fwd; print('torch_fwd imports')" 2>&1 | tail -3
  } > "$OUT/gpu_env.txt" 2>&1
fi
if step tests; then
  timeout 120 $PY -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark tests/test_triton_kernels.py \
    > "$OUT/gpu_kernel_tests.txt" 2>&1
  echo "exit $?" >> "$OUT/gpu_kernel_tests.txt"
  tail -3 "$OUT/gpu_kernel_tests.txt"
fi
if step profile; then
  timeout 100 $PY -m benchmarks.gpu_profile --calls 100 > "$OUT/profile.md" 2>&1
  echo "exit $?" >> "$OUT/profile.md"
fi
if step kernels; then
  timeout 150 $PY -m benchmarks.gpu --sections "$GPU_SECTIONS" --out "$OUT" > "$OUT/gpu_bench.txt" 2>&1
  rc=$?
  echo "exit $rc" >> "$OUT/gpu_bench.txt"
  # (gpu.md holds the same tables; the device tool brings back eight files at most)
  [ "$rc" = 0 ] && rm -f "$OUT/gpu_bench.txt"
fi
if step suite; then
  timeout "$SUITE_TIMEOUT" $PY -m benchmarks --device cuda --rounds "$SUITE_ROUNDS" --no-jacobian --out "$OUT" \
    --cases "$SUITE_CASES" --compile-rounds "$SUITE_COMPILE_ROUNDS" > "$OUT/suite_cuda.txt" 2>&1
  echo "exit $?" >> "$OUT/suite_cuda.txt"
  rm -f "$OUT/suite.png"
  tail -14 "$OUT/suite.md"
fi
ls -la "$OUT"
