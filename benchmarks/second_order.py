"""linearize and Laplacian timings (one process, ratios within one run).

- linearize: 100 calls of ``jvp_fn`` from ``torch_fwd.linearize`` against 100 calls of
  ``torch_fwd.jvp`` (graph path, cached) and 100 calls of ``torch.func.linearize``'s
  ``jvp_fn``, on a tanh MLP and a pre-LN attention block (float32). The one-off cost of each
  linearize is reported on its own.
- Laplacian: ``torch_fwd.laplacian`` of a tanh MLP u: R^d -> R on a batch of points against
  ``torch.func`` (the trace of ``vmap(jacfwd(jacrev(u)))``) and a loop of d nested
  ``torch.func.jvp`` calls (sum of e_i^T H e_i), for d = 10, 100, 1000.

Times are medians of ``--repeat`` rounds after a warm-up round.

    python -m benchmarks.second_order [--quick] [--repeat 5] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import torch_fwd
from benchmarks.timing import median_time
from examples.models import transformer_block


def _linearize_cases():
    torch.manual_seed(0)
    W = [torch.randn(256, 256) / 16 for _ in range(4)]

    def mlp(x):
        for w in W:
            x = torch.tanh(x @ w)
        return x
    block = transformer_block(64, 4)
    return [("tanh MLP 4x256, batch 64", mlp, torch.randn(64, 256)),
            ("pre-LN attention block, 4x32x64", block, torch.randn(4, 32, 64))]


def bench_linearize(calls, repeat):
    rows = []
    for name, f, x in _linearize_cases():
        vs = [torch.randn_like(x) for _ in range(calls)]
        t0 = time.perf_counter()
        _, ours = torch_fwd.linearize(f, x)
        ours_setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            _, theirs = torch.func.linearize(f, x)
            theirs_setup = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            theirs, theirs_setup = None, f"error ({type(e).__name__})"
        torch_fwd.jvp(f, (x,), (vs[0],))  # capture once: what a user's second call sees
        row = {"case": name, "calls": calls,
               "torch_fwd.linearize": median_time(lambda: [ours(v) for v in vs], repeat),
               "torch_fwd.jvp": median_time(lambda: [torch_fwd.jvp(f, (x,), (v,)) for v in vs], repeat),
               "torch.func.linearize": (median_time(lambda: [theirs(v) for v in vs], repeat)
                                        if theirs is not None else theirs_setup),
               "primal": median_time(lambda: [f(x) for _ in vs], repeat),
               "setup torch_fwd.linearize": ours_setup, "setup torch.func.linearize": theirs_setup}
        if theirs is not None:
            torch.testing.assert_close(ours(vs[0]), theirs(vs[0]), atol=1e-4, rtol=1e-4)
        rows.append(row)
    return rows


def _pinn(d, width=64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                              torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
                              torch.nn.Linear(width, 1)).double()
    for p in net.parameters():
        p.requires_grad_(False)
    return lambda x: net(x).squeeze(-1)


def bench_laplacian(dims, points, repeat):
    rows = []
    for d in dims:
        u = _pinn(d)
        x = torch.randn(points, d, dtype=torch.float64)
        ours = lambda: torch_fwd.laplacian(u, x, batch_dims=1)  # noqa: E731
        single = lambda p: u(p[None])[0]  # noqa: E731

        def hessian_trace():
            return torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(single)))(x).diagonal(
                dim1=-2, dim2=-1).sum(-1)

        def nested_loop():
            total = torch.zeros(points, dtype=x.dtype)
            for i in range(d):
                e = torch.zeros_like(x)
                e[:, i] = 1
                total += torch.func.jvp(lambda z: torch.func.jvp(u, (z,), (e,))[1], (x,), (e,))[1]
            return total
        ref = hessian_trace()
        torch.testing.assert_close(ours(), ref)
        rows.append({"d": d, "points": points,
                     "torch_fwd.laplacian": median_time(ours, repeat),
                     "torch.func hessian trace": median_time(hessian_trace, repeat),
                     "torch.func nested-jvp loop": median_time(nested_loop, max(1, repeat // 2))})
    return rows


def _markdown(meta, lin, lap):
    out = [f"# linearize and Laplacian ({meta['machine']}, torch {meta['torch']}, {meta['threads']} threads)", "",
           "## linearize: time of 100 tangent evaluations (seconds; ratio to 100 primal calls)", "",
           "| case | torch_fwd.linearize | torch_fwd.jvp (graph, cached) | torch.func.linearize | "
           "setup: ours / torch.func |", "|---|---:|---:|---:|---:|"]
    for r in lin:
        p = r["primal"]

        def cell(v):
            return f"{v:.4f} ({v / p:.1f}x)" if isinstance(v, float) else str(v)
        setup_theirs = r["setup torch.func.linearize"]
        setup_theirs = f"{setup_theirs:.2f}" if isinstance(setup_theirs, float) else setup_theirs
        out.append(f"| {r['case']} | {cell(r['torch_fwd.linearize'])} | {cell(r['torch_fwd.jvp'])} | "
                   f"{cell(r['torch.func.linearize'])} | {r['setup torch_fwd.linearize']:.2f} / {setup_theirs} |")
    out += ["", "## Laplacian of a tanh MLP (3 hidden layers of 64), float64 (seconds)", "",
            "| d | points | torch_fwd.laplacian | torch.func hessian trace | torch.func nested-jvp loop |",
            "|---:|---:|---:|---:|---:|"]
    for r in lap:
        out.append(f"| {r['d']} | {r['points']} | {r['torch_fwd.laplacian']:.4f} | "
                   f"{r['torch.func hessian trace']:.4f} | {r['torch.func nested-jvp loop']:.4f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and dims, for a smoke run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    calls, dims, points = (10, (10,), 4) if args.quick else (100, (10, 100, 1000), 16)
    repeat = 1 if args.quick else args.repeat
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    lin = bench_linearize(calls, repeat)
    lap = bench_laplacian(dims, points, repeat)
    md = _markdown(meta, lin, lap)
    print(md)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "second_order.json"), "w") as f:
            json.dump({"meta": meta, "linearize": lin, "laplacian": lap}, f, indent=1)
        with open(os.path.join(args.out, "second_order.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
