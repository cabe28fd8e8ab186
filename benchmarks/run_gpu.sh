#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (see the device tool): the kernel tests on the
# GPU, without Triton's interpreter, then benchmarks.gpu. Output under $OUT (default
# benchmarks/results). Usage: OUT=... bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python -m pip install --quiet -e ".[test]"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu_card.txt"
python -m pytest -q tests/test_triton_kernels.py 2>&1 | tail -20 | tee "$OUT/gpu_kernel_tests.txt"
python -m benchmarks.gpu --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.txt"
