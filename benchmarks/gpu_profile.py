"""Where a JVP call's time goes, per path: python -m benchmarks.gpu_profile [--device cuda]
[--cases a,b] [--calls N]

For each case of the suite and each of torch_fwd's paths (the default, the graph path, the
compiled path), after warm-up:

- on CUDA, the synchronising operations one call makes (``torch.cuda.set_sync_debug_mode``;
  each one stalls the CPU until the GPU has caught up), with the Python line that made it;
- cProfile of N calls: the functions with the most time of their own;
- on CUDA, torch.profiler over 20 calls: the operators and kernels with the most self time
  on the CPU and on the GPU.

A diagnostic, not a benchmark: the suite (``python -m benchmarks``) gives the ratios.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import warnings

import torch

import torch_fwd

from .suite import CASES

PATHS = {
    "torch_fwd": {},
    "torch_fwd graph": {"path": "graph"},
    "torch_fwd compiled": {"compile": True},
}


def _syncs(call):
    """(file:line, message) of each synchronising CUDA operation ``call`` makes."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    return [(f"{w.filename}:{w.lineno}", str(w.message).splitlines()[0][:120]) for w in caught
            if "synchroniz" in str(w.message)]


def profile_case(case, device, calls, out):
    torch.manual_seed(0)
    primals = case.make(device, False)
    tangents = tuple(torch.randn_like(p) for p in primals)
    with torch.no_grad():
        for path, kw in PATHS.items():
            call = (lambda: torch_fwd.jvp(case.fn, primals, tangents, **kw))  # noqa: E731
            try:
                for _ in range(3):
                    call()
            except Exception as e:  # noqa: BLE001
                print(f"## {case.name}, {path}: {type(e).__name__}: {str(e)[:200]}\n", file=out)
                continue
            print(f"## {case.name}, {path} ({torch_fwd.explain()})\n", file=out)
            if device == "cuda":
                syncs = _syncs(call)
                print(f"synchronising operations in one call: {len(syncs)}", file=out)
                for where, msg in syncs[:5]:
                    print(f"  {where}: {msg}", file=out)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                call()
            if device == "cuda":
                torch.cuda.synchronize()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
            body = text.getvalue()
            print("```\n" + body[body.find("ncalls") - 3 if "ncalls" in body else 0:].rstrip() + "\n```\n", file=out)
            if device == "cuda":
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        call()
                    torch.cuda.synchronize()
                for key in ("self_cpu_time_total", "self_device_time_total"):
                    print("```\n" + prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60)
                          + "```\n", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default="sin_cos_exp_1e6_f32,gelu_mlp_4x1024_f32,transformer_block_f32")
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args(argv)
    wanted = a.cases.split(",")
    unknown = [n for n in wanted if n not in {c.name for c in CASES}]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}")
    print(f"# Profile of JVP calls ({a.device}, torch {torch.__version__}, {a.calls} calls each)\n")
    for case in CASES:
        if case.name in wanted:
            profile_case(case, a.device, a.calls, sys.stdout)


if __name__ == "__main__":
    main()
