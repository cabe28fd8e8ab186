"""Jacobian benchmark: torch_fwd.jacfwd (chunk sizes 8, 64, auto) against torch.func.jacfwd
and torch.func.jacrev(chunk_size=64), on a float64 MLP with 6400 inputs.

Each row runs in a fresh subprocess. Peak memory is the highest resident set a 1 ms
sampling thread sees during the timed calls, minus the resident set just before them
(after one warm-up call, so torch_fwd's one-off capture is not counted; its first-call
time is reported on its own). Time is the median of ``--repeat`` calls.

    python -m benchmarks.jacobian [--n 6400] [--repeat 3] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROW = r"""
import json, resource, statistics, sys, time, torch
import torch_fwd
torch.set_num_threads(int(sys.argv[4]))
torch.manual_seed(0)
n, method, repeat = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
H, O = 256, 16
W1 = torch.randn(H, n, dtype=torch.float64) / n ** 0.5
W2 = torch.randn(H, H, dtype=torch.float64) / H ** 0.5
W3 = torch.randn(O, H, dtype=torch.float64) / H ** 0.5
def mlp(x):
    return W3 @ torch.tanh(W2 @ torch.tanh(W1 @ x))
x = torch.randn(n, dtype=torch.float64)
if method.startswith("torch_fwd"):
    k = method.split(":")[1]
    jac = torch_fwd.jacfwd(mlp, chunk_size=None if k == "auto" else int(k))
elif method == "torch.func.jacfwd":
    jac = torch.func.jacfwd(mlp)
else:
    jac = torch.func.jacrev(mlp, chunk_size=64)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
import threading
t0 = time.perf_counter(); J = jac(x); first = time.perf_counter() - t0
del J
base = rss()
peak_seen = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak_seen[0] = max(peak_seen[0], rss())
        time.sleep(0.001)
sampler = threading.Thread(target=sample); sampler.start()
times = []
for _ in range(repeat):
    t0 = time.perf_counter(); J = jac(x); times.append(time.perf_counter() - t0)
stop.set(); sampler.join()
peak = peak_seen[0] - base
ref = torch.func.jacrev(mlp)(x) if method != "torch.func.jacrev(64)" else J
print(json.dumps({"method": method, "first_s": first, "median_s": statistics.median(times),
                  "min_s": min(times), "max_s": max(times), "peak_mib": peak / 2**20,
                  "max_err": (J - ref).abs().max().item()}))
"""

METHODS = ["torch_fwd.jacfwd:8", "torch_fwd.jacfwd:64", "torch_fwd.jacfwd:auto", "torch.func.jacfwd",
           "torch.func.jacrev(64)"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    rows = []
    for m in METHODS:
        label = m.replace("torch_fwd.jacfwd:", "torch_fwd.jacfwd chunk=")
        # glibc's dynamic mmap threshold would keep freed blocks resident, hiding the
        # growth of later calls: a fixed threshold returns large blocks on free.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        proc = subprocess.run([sys.executable, "-c", ROW, str(args.n), m, str(args.repeat), str(args.threads)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            rows.append({"method": label, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["method"] = label
            rows.append(row)
        print(_fmt(rows[-1]), flush=True)
    import torch
    meta = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": args.threads, "n_inputs": args.n, "mlp": f"{args.n}-256-256-16 tanh, float64"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "jacobian.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    md = ["| method | median time (s) | min-max (s) | first call (s) | peak memory (MiB) | max abs error |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['method']} | error: {r['error']} | | | | |")
        else:
            md.append(f"| {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {r['first_s']:.3f} "
                      f"| {r['peak_mib']:.0f} | {r['max_err']:.1e} |")
    text = f"Jacobian of a {meta['mlp']} MLP; torch {meta['torch']}, {args.threads} threads.\n\n" + "\n".join(md) + "\n"
    with open(os.path.join(args.out, "jacobian.md"), "w") as f:
        f.write(text)
    print(text)


def _fmt(r):
    if "error" in r:
        return f"{r['method']}: error {r['error']}"
    return f"{r['method']}: {r['median_s']:.3f} s, +{r['peak_mib']:.0f} MiB"


if __name__ == "__main__":
    main()
