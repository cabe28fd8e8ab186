set -uo pipefail
export PYTHONPATH=$PWD
python3 -c "import torch_fwd" || exit 1
timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton_kernels.py > "$OUT/gpu_kernel_tests.txt" 2>&1; echo "exit $?" >> "$OUT/gpu_kernel_tests.txt"
timeout 230 python3 -m benchmarks --device cuda --rounds 3 --no-jacobian --out "$OUT" --cases sin_cos_exp_1e6_f32,gelu_mlp_4x1024_f32,transformer_block_f32 > "$OUT/suite_cuda.txt" 2>&1; echo "exit $?" >> "$OUT/suite_cuda.txt"
rm -f $OUT/suite.png; tail -3 $OUT/gpu_kernel_tests.txt; tail -12 $OUT/suite.md
