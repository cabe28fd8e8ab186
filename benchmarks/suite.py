"""The benchmark suite: the time of one JVP over the time of the eager primal (the
performance ratio), per case and system, measured in one process with interleaved rounds.

Cases: Mooncake.jl's suite ported to PyTorch (benchmarks/cases.py) plus sin*cos+exp on 1e6
float32 elements, a 4-layer width-1024 GELU MLP, a pre-LN transformer block with default
attention, a small GPT-2 (random weights) and a ResNet-style CNN. Columns: torch_fwd as a
user calls it (no options), its eager and graph paths, torch.func.jvp,
torch.autograd.forward_ad, torch_fwd compiled (``jvp(compile=True)``) and
torch.compile(torch.func.jvp); the compiled two are also given against the compiled primal,
with compile times. A cell that fails says ``error`` with the exception's class.
torch_fwd's first call (the capture) is its own column.

Timing: ``torch.utils.benchmark.Timer`` per cell, a warm-up call first, then ``--rounds``
rounds in which every system of a case runs in turn (interleaved, so drifting machine load
hits all alike); the median over rounds, with min and max, is reported. Compile times
(the first call of ``torch_fwd compiled`` and of ``torch.compile(f)``) are the median of
``--compile-rounds`` compiles taken in turn, min and max beside it; the reference
torch.compile(torch.func.jvp) is compiled once. Everything runs under
``torch.no_grad()``.

    python -m benchmarks [--quick] [--cases a,b] [--device cpu|cuda] [--rounds 5] [--compile-rounds 3]
                         [--out DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tbench

import torch_fwd
from benchmarks import cases as C


@dataclasses.dataclass
class Case:
    name: str
    fn: Callable
    make: Callable  # (device, quick) -> primals
    quick: bool = False  # part of --quick


def _r(*shape, dtype=torch.float64, device="cpu", scale=1.0):
    return torch.randn(*shape, dtype=dtype, device=device) * scale


def _mlp_1024(device):
    Ws = [torch.randn(1024, 1024, device=device) / 32 for _ in range(4)]

    def mlp(x):
        for w in Ws:
            x = F.gelu(x @ w)
        return x
    return mlp


def _transformer_block(device):
    from examples.models import transformer_block
    return transformer_block(128, 4, device)


def _frozen(m, device):
    m = m.to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _gpt2(device):
    import transformers as T
    m = _frozen(T.GPT2Model(T.GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=1000, n_positions=128,
                                         bos_token_id=0, eos_token_id=0)), device)
    return lambda e: m(inputs_embeds=e).last_hidden_state


def _resnet(device):
    from examples.models import ResNet
    return _frozen(ResNet(channels=16, classes=10, in_channels=3), device)


class _Model:
    """A case function whose model is built by the case's ``make`` on the chosen device
    (building it inside a JVP would trace the construction; transformers imports take
    seconds, so nothing is built at import)."""

    def __init__(self, factory):
        self.factory, self.f = factory, None
        self.__name__ = factory.__name__.strip("_")

    def build(self, device):
        if self.f is None:
            self.f = self.factory(device)

    def __call__(self, *a):
        return self.f(*a)


def _built(model, make):
    def mk(d, q):
        model.build(d)
        return make(d, q)
    return mk


_MLP, _BLOCK, _GPT2, _RESNET = (_Model(f) for f in (_mlp_1024, _transformer_block, _gpt2, _resnet))

CASES = [
    Case("sum_1000", C.sum_1000, lambda d, q: (_r(1000, device=d),), quick=True),
    Case("_sum_1000", C._sum_1000, lambda d, q: (_r(100 if q else 1000, device=d),)),
    Case("sum_sin_1000", C.sum_sin_1000, lambda d, q: (_r(1000, device=d),), quick=True),
    Case("_sum_sin_1000", C._sum_sin_1000, lambda d, q: (_r(100 if q else 1000, device=d),)),
    Case("kron_sum", C.kron_sum, lambda d, q: (_r(20, 20, device=d), _r(20, 20, device=d))),
    Case("kron_view_sum", C.kron_view_sum, lambda d, q: (_r(20, 20, device=d), _r(20, 21, device=d))),
    Case("naive_map_sin_cos_exp", C.naive_map_sin_cos_exp, lambda d, q: (_r(100, device=d),)),
    Case("map_sin_cos_exp", C.map_sin_cos_exp, lambda d, q: (_r(100, device=d),)),
    Case("broadcast_sin_cos_exp", C.broadcast_sin_cos_exp, lambda d, q: (_r(1000, device=d),)),
    Case("simple_mlp", C.simple_mlp, lambda d, q: (_r(64, 32, device=d, scale=0.2), _r(32, 64, device=d, scale=0.2),
                                                   _r(32, 16, device=d))),
    Case("gp_lml", C.gp_lml, lambda d, q: (_r(128, device=d), _r(128, device=d),
                                           torch.tensor(0.1, dtype=torch.float64, device=d),
                                           torch.tensor(-1.0, dtype=torch.float64, device=d)), quick=True),
    Case("large_single_block", C.large_single_block, lambda d, q: (_r(1000, device=d, scale=0.5),)),
    *[Case(f.__name__, f, lambda d, q: (_r(64, 64, device=d, scale=0.5 / 8), _r(64, 32, device=d)))
      for f in (C.break_branch, C.break_print, C.break_numpy, C.break_item, C.iterate_to_tolerance)],
    Case("sin_cos_exp_1e6_f32", C.broadcast_sin_cos_exp,
         lambda d, q: (torch.randn(10 ** 4 if q else 10 ** 6, device=d),)),
    Case("gelu_mlp_4x1024_f32", _MLP, _built(_MLP, lambda d, q: (torch.randn(8 if q else 64, 1024, device=d),))),
    Case("transformer_block_f32", _BLOCK, _built(_BLOCK, lambda d, q: (torch.randn(2, 16 if q else 64, 128, device=d),))),
    Case("gpt2_small_f32", _GPT2, _built(_GPT2, lambda d, q: (torch.randn(2, 16 if q else 64, 128, device=d),))),
    Case("resnet_cnn_f32", _RESNET, _built(_RESNET, lambda d, q: (torch.randn(4 if q else 16, 3, 32, 32, device=d),))),
]


def _forward_ad(f, primals, tangents):
    from torch.autograd import forward_ad as fwAD
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        return fwAD.unpack_dual(out).tangent


def _systems(quick, compile_columns=True):
    """name -> (f, primals, tangents) -> a zero-argument callable doing one JVP."""
    systems = {
        "torch_fwd": lambda f, p, t: (lambda: torch_fwd.jvp(f, p, t)),
        "torch_fwd eager": lambda f, p, t: (lambda: torch_fwd.jvp(f, p, t, path="eager")),
        "torch_fwd graph": lambda f, p, t: (lambda: torch_fwd.jvp(f, p, t, path="graph")),
        "torch.func.jvp": lambda f, p, t: (lambda: torch.func.jvp(f, p, t)),
        "forward_ad": lambda f, p, t: (lambda: _forward_ad(f, p, t)),
    }
    if not quick and compile_columns:
        systems["torch_fwd compiled"] = lambda f, p, t: (lambda: torch_fwd.jvp(f, p, t, compile=True))

        def compiled_func_jvp(f, p, t):
            g = torch.compile(lambda *pt: torch.func.jvp(f, pt[:len(p)], pt[len(p):]))
            return lambda: g(*p, *t)
        systems["torch.compile(torch.func.jvp)"] = compiled_func_jvp
    return systems


#: the columns whose ratio is also given against the compiled primal (torch.compile(f))
COMPILED = ("torch_fwd compiled", "torch.compile(torch.func.jvp)")
#: the columns whose compile, like the primal's, is timed ``compile_rounds`` times
REPEATED_COMPILES = ("torch_fwd compiled",)


def _warm_up_inductor(device):
    """Compile one small function, so that no case's compile times include Inductor's
    one-off imports and start-up. It has a matmul: the first matmul Inductor lowers in a
    process hashes Triton's sources for its autotuning cache key (~1.3 s on these CPUs,
    even on CPU), which would otherwise land on whichever case compiles one first."""
    torch.compile(lambda x: (x @ x).sin() + 1)(torch.randn(4, 4, device=device))


def _per_call(fn, min_time):
    """Seconds per call by torch.utils.benchmark (it synchronises CUDA)."""
    # the process's thread count: Timer's default of one thread changes global state that
    # dynamo guards on (each compiled column would recompile inside the timing loop)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    # (a bounded max_run_time: on a loaded machine a fast call may never meet the
    # confidence test, and adaptive_autorange's check re-reads every measurement so far,
    # so its default of 10 s of measurements took many minutes of checking)
    return timer.adaptive_autorange(min_run_time=min_time, max_run_time=max(1.0, 20 * min_time)).median


def run(cases, device, rounds, quick, compile_columns=True, progress=sys.stderr, only=None, compile_rounds=1):
    """The suite's rows and column names. Inductor's caches are off during the run (every
    compile of the compiled columns is measured) and as they were after it."""
    import torch._inductor.config as inductor_config
    with inductor_config.patch(force_disable_caches=True):
        return _run(cases, device, rounds, quick, compile_columns, progress, only, compile_rounds)


def _run(cases, device, rounds, quick, compile_columns, progress, only, compile_rounds=1):
    systems = _systems(quick, compile_columns)
    if only:
        unknown = [n for n in only if n not in systems]
        if unknown:
            raise SystemExit(f"unknown systems {unknown}; known: {list(systems)}")
        systems = {n: m for n, m in systems.items() if n in only}
    compiled_ref = any(n in COMPILED for n in systems)
    if compiled_ref:
        _warm_up_inductor(device)
    min_time = 0.02 if quick else 0.1
    rows = []
    for ci, case in enumerate(cases):
        torch.manual_seed(0)
        primals = case.make(device, quick)
        tangents = tuple(torch.randn_like(p) for p in primals)
        row = {"case": case.name, "first_call_s": None, "cells": {}, "first_calls_s": {}}
        calls = {}
        # Compile times vary from one compile to the next by as much as the 2x torch_fwd's
        # compile is held to against the primal's (seconds of Python and g++ on a shared
        # machine): the primal's compile and torch_fwd's are repeated ``compile_rounds``
        # times, in turn (a fresh dynamo cache before each round; Inductor's caches are
        # off), and the median is reported. The other columns' first calls, the reference
        # torch.compile(torch.func.jvp)'s included (330 s on large_single_block), are timed
        # once, in the last round, whose compiled functions are the ones timed.
        first_calls = {}
        with torch.no_grad():
            primal = lambda: case.fn(*primals)  # noqa: E731
            primal()
            n_rounds = compile_rounds if compiled_ref else 1
            for cr in range(n_rounds):
                last = cr == n_rounds - 1
                tag = f" ({cr + 1}/{n_rounds})" if n_rounds > 1 else ""
                if compiled_ref:
                    # a fresh dynamo cache per case and round: the compiled columns' wrappers
                    # share code objects across cases, and past dynamo's recompile limit a
                    # column would silently run uncompiled
                    torch._dynamo.reset()
                    print(f"[{ci + 1}/{len(cases)}] {case.name}: compiling the primal{tag}", file=progress, flush=True)
                    cfn = torch.compile(case.fn)
                    t0 = time.perf_counter()
                    cfn(*primals)
                    first_calls.setdefault("compiled primal", []).append(time.perf_counter() - t0)
                    calls["compiled primal"] = lambda cfn=cfn: cfn(*primals)
                for name, make in systems.items():
                    if (not last and name not in REPEATED_COMPILES) or name in row["cells"]:
                        continue
                    print(f"[{ci + 1}/{len(cases)}] {case.name}: warm-up {name}{tag if name in REPEATED_COMPILES else ''}",
                          file=progress, flush=True)
                    try:
                        call = make(case.fn, primals, tangents)
                        t0 = time.perf_counter()
                        call()
                        first_calls.setdefault(name, []).append(time.perf_counter() - t0)
                        if last:
                            if name.startswith("torch_fwd"):
                                row.setdefault("paths", {})[name] = torch_fwd.explain()
                            calls[name] = call
                    except Exception as e:  # noqa: BLE001
                        row["cells"][name] = {"error": type(e).__name__, "message": str(e).splitlines()[0][:200]}
                        calls.pop(name, None)
            for name, ts in first_calls.items():
                row["first_calls_s"][name] = statistics.median(ts)
                if len(ts) > 1:
                    row.setdefault("first_calls_range_s", {})[name] = [min(ts), max(ts)]
            row["first_call_s"] = row["first_calls_s"].get("torch_fwd")
            samples = {name: [] for name in ["primal"] + list(calls)}
            for r in range(rounds):
                print(f"[{ci + 1}/{len(cases)}] {case.name}: round {r + 1}/{rounds}", file=progress, flush=True)
                for name, call in [("primal", primal)] + list(calls.items()):
                    try:
                        samples[name].append(_per_call(call, min_time))
                    except Exception as e:  # noqa: BLE001
                        row["cells"][name] = {"error": type(e).__name__, "message": str(e).splitlines()[0][:200]}
                        calls.pop(name, None)
        p = statistics.median(samples["primal"])
        row["primal_s"] = {"median": p, "min": min(samples["primal"]), "max": max(samples["primal"])}
        for name, ts in samples.items():
            if name == "primal" or name in row["cells"] or not ts:
                continue
            row["cells"][name] = {"median_s": statistics.median(ts), "ratio": statistics.median(ts) / p,
                                  "ratio_min": min(ts) / p, "ratio_max": max(ts) / p}
        cp = row["cells"].get("compiled primal", {}).get("median_s")
        for name in COMPILED:
            c = row["cells"].get(name)
            if cp and c and "median_s" in c:
                c["ratio_compiled"] = c["median_s"] / cp
        rows.append(row)
    return rows, list(systems)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def markdown(meta, rows, systems):
    lines = [f"# JVP benchmark suite ({meta['machine']}, {meta['device']}, torch {meta['torch']}, "
             f"{meta['threads']} threads{', quick' if meta['quick'] else ''})", "",
             "Time of one JVP / time of the eager primal (median over rounds; min-max in brackets).", "",
             "| case | " + " | ".join(systems) + " | torch_fwd first call | primal |",
             "|---|" + "---:|" * (len(systems) + 2)]
    for r in rows:
        cells = []
        for s in systems:
            c = r["cells"].get(s)
            if c is None:
                cells.append("")
            elif "error" in c:
                cells.append(f"error ({c['error']})")
            else:
                cells.append(f"{c['ratio']:.1f} [{c['ratio_min']:.1f}-{c['ratio_max']:.1f}]")
        first = f"{r['first_call_s']:.2f} s" if r["first_call_s"] is not None else ""
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {first} | {r['primal_s']['median'] * 1e6:.0f} us |")
    gm = []
    for s in systems:
        gm.append(f"{_geomean([r['cells'].get(s, {}).get('ratio') for r in rows]):.1f}")
    lines.append("| geometric mean (cases that ran) | " + " | ".join(gm) + " | | |")
    compiled = [s for s in COMPILED if s in systems]
    if compiled:
        lines += ["", "## Compiled", "",
                  "Time of one compiled JVP / time of the compiled primal (`torch.compile(f)`, Inductor); "
                  "compile time is the first call's (Inductor's caches off)"
                  + (f"; the primal's and torch_fwd's are the median of {meta['compile_rounds']} compiles taken in "
                     "turn (min-max in brackets), the others' one compile" if meta.get("compile_rounds", 1) > 1 else "")
                  + ".", "",
                  "| case | " + " | ".join(compiled) + " | compile: primal | " + " | ".join(f"compile: {s}" for s in compiled)
                  + " | compiled primal |",
                  "|---|" + "---:|" * (2 * len(compiled) + 2)]
        for r in rows:
            cells = []
            for s in compiled:
                c = r["cells"].get(s, {})
                cells.append(f"error ({c['error']})" if "error" in c else
                             f"{c['ratio_compiled']:.2f}" if "ratio_compiled" in c else "")
            fc, rng = r.get("first_calls_s", {}), r.get("first_calls_range_s", {})
            comp = [(f"{fc[s]:.1f} s" + (f" [{rng[s][0]:.1f}-{rng[s][1]:.1f}]" if s in rng else "")) if s in fc else ""
                    for s in ["compiled primal"] + compiled]
            cp = r["cells"].get("compiled primal", {}).get("median_s")
            lines.append(f"| {r['case']} | " + " | ".join(cells) + " | " + " | ".join(comp)
                         + (f" | {cp * 1e6:.0f} us |" if cp else " | |"))
        lines.append("| geometric mean | " + " | ".join(
            f"{_geomean([r['cells'].get(s, {}).get('ratio_compiled') for r in rows]):.2f}" for s in compiled)
            + " |" + " |" * (len(compiled) + 2))
    odd = [(r["case"], s, p) for r in rows for s, p in r.get("paths", {}).items()
           if p and not p.startswith({"torch_fwd eager": "eager", "torch_fwd compiled": "compiled"}.get(s, "graph"))]
    if odd:
        lines += ["", "Paths other than the column's (torch_fwd.explain() after the first call):", ""]
        lines += [f"- {c}, {s}: {p[:300]}" for c, s, p in odd]
    lines += ["", ("" if compiled else "Compiled columns: not run (--no-compile). ")
              + "JAX: " + ("measured separately" if meta.get("jax") else "not installed here, column omitted") + "."]
    return "\n".join(lines) + "\n"


def plot(rows, systems, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs = [j + i * width for j in range(len(rows))]
        ys = [r["cells"].get(s, {}).get("ratio", float("nan")) for r in rows]
        ax.bar(xs, ys, width, label=s)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["case"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("JVP time / primal time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small cases, no compile columns (about a minute)")
    ap.add_argument("--cases", default=None, help="comma-separated case names")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-jacobian", action="store_true", help="skip the Jacobian section")
    ap.add_argument("--no-distributed", action="store_true",
                    help="skip the distributed training step (2 processes, DDP and FSDP2)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled columns (Inductor compiles each case: minutes on a CPU)")
    ap.add_argument("--systems", default=None, help="comma-separated column names (default: all)")
    ap.add_argument("--compile-rounds", type=int, default=3,
                    help="compiles per case of the primal and of torch_fwd compiled, for their compile times (median "
                         "reported; default 3)")
    args = ap.parse_args(argv)
    if args.compile_rounds < 1:
        raise SystemExit("--compile-rounds must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    chosen = CASES
    if args.cases:
        names = args.cases.split(",")
        unknown = [n for n in names if n not in {c.name for c in CASES}]
        if unknown:
            raise SystemExit(f"unknown cases {unknown}; known: {[c.name for c in CASES]}")
        chosen = [c for c in CASES if c.name in names]
    elif args.quick:
        chosen = [c for c in CASES if c.quick]
    rounds = args.rounds or (2 if args.quick else 5)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "device": args.device,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
            "python": platform.python_version(), "compile_rounds": args.compile_rounds}
    rows, systems = run(chosen, args.device, rounds, args.quick, not args.no_compile,
                        only=args.systems.split(",") if args.systems else None, compile_rounds=args.compile_rounds)
    md = markdown(meta, rows, systems)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = "suite_quick" if args.quick else "suite"
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump({"meta": meta, "systems": systems, "rows": rows}, fh, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(md)
    if plot(rows, systems, os.path.join(args.out, stem + ".png")):
        print(f"plot: {os.path.join(args.out, stem + '.png')}")
    if not args.quick and not args.no_jacobian:
        from benchmarks import jacobian
        jacobian.main(["--out", args.out])
    if not args.quick and not args.no_distributed and torch.distributed.is_available():
        from benchmarks import distributed
        distributed.main(["--out", args.out])
    return rows


if __name__ == "__main__":
    main()
