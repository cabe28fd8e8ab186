export PYTHONPATH=$PWD
timeout 60 python3 - <<'PY' > $OUT/gpu_compiled_check.txt 2>&1
import torch, torch_fwd, time
from torch_fwd.backend import stats
x = torch.randn(4096, 1024, device="cuda"); v = torch.randn_like(x)
W = torch.randn(1024, 1024, device="cuda") / 32
f = lambda x: torch.nn.functional.gelu(x @ W).sin()
with torch.no_grad():
    t0 = time.time(); out, t = torch_fwd.jvp(f, (x,), (v,), compile=True); torch.cuda.synchronize()
    print("first call", round(time.time() - t0, 2), "s;", torch_fwd.explain(), stats)
    ref = torch_fwd.jvp(f, (x,), (v,), path="eager")[1]
    print("max abs diff vs eager path", (t - ref).abs().max().item())
PY
timeout 130 python3 -m benchmarks --device cuda --rounds 2 --no-jacobian --out $OUT --cases gelu_mlp_4x1024_f32,sin_cos_exp_1e6_f32 --systems "torch_fwd,torch_fwd compiled,torch.compile(torch.func.jvp)" > $OUT/suite_cuda_compiled.txt 2>&1
rm -f $OUT/suite.png; cat $OUT/gpu_compiled_check.txt; tail -14 $OUT/suite.md
