"""What any eager forward mode built on a Python ``__torch_dispatch__`` subclass costs at
least, next to torch_fwd's eager path, torch.func.jvp and forward_ad.

``python -m benchmarks.eager_floor [--n 1000] [--rounds 5] [--out DIR]``

The function is Mooncake's ``_sum_1000`` (a Python loop over elements: two ATen ops per
element, ``select`` and ``add``), where per-op overhead is everything. Two stripped-down
wrapper subclasses bound what Python dispatch alone costs:

- ``passthrough``: a wrapper subclass whose ``__torch_dispatch__`` unwraps, runs the op on
  the primal and wraps the result: no tangent at all;
- ``minimal dual``: the same with a tangent, and hand-written rules for exactly the two
  ops the loop runs (no rule table, no levels, no views, no checks);
- ``minimal dual, __torch_function__``: those two rules run from ``__torch_function__``,
  before the C++ dispatcher is entered: the least a Python forward mode can cost per op.

torch.func.jvp and forward_ad differentiate in C++ (functorch's and autograd's forward-AD
kernels); every row below them pays Python per op. The tangents of the minimal dual are
checked against torch.func.jvp before anything is timed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import torch_fwd
from benchmarks.cases import _sum_1000

aten = torch.ops.aten


def _wrapper(cls, p):
    return torch.Tensor._make_wrapper_subclass(cls, p.size(), strides=p.stride(), dtype=p.dtype, device=p.device)


class Passthrough(torch.Tensor):
    """Python dispatch and a wrapper per op, nothing else."""

    @staticmethod
    def __new__(cls, p):
        r = _wrapper(cls, p)
        r.p = p
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args = [a.p if isinstance(a, Passthrough) else a for a in args]
        return Passthrough(func(*args, **(kwargs or {})))


class MinimalDual(torch.Tensor):
    """A primal and a tangent, with the loop's two rules written out."""

    @staticmethod
    def __new__(cls, p, t):
        r = _wrapper(cls, p)
        r.p, r.t = p, t
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is aten.select.int:
            x, dim, index = args
            return MinimalDual(func(x.p, dim, index), x.t.select(dim, index))
        if func is aten.add.Tensor and not kwargs:
            a, b = args
            ap, at = (a.p, a.t) if isinstance(a, MinimalDual) else (a, None)
            bp, bt = (b.p, b.t) if isinstance(b, MinimalDual) else (b, None)
            t = bt if at is None else at if bt is None else at + bt
            return MinimalDual(func(ap, bp), t)
        raise NotImplementedError(f"MinimalDual has no rule for {func}")


class FunctionLevelDual(torch.Tensor):
    """The minimal dual one level up: ``__torch_function__`` runs the loop's two ops on
    primal and tangent itself, so no op reaches the C++ dispatcher with a Dual (what a
    ``__torch_function__`` front to the eager path could save at most)."""

    @staticmethod
    def __new__(cls, p, t):
        r = _wrapper(cls, p)
        r.p, r.t = p, t
        return r

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and type(args[1]) is int:
            x, i = args
            return FunctionLevelDual(x.p[i], x.t[i])
        if func in (torch.Tensor.__add__, torch.Tensor.add) and not kwargs:
            a, b = args
            ap, at = (a.p, a.t) if isinstance(a, FunctionLevelDual) else (a, None)
            bp, bt = (b.p, b.t) if isinstance(b, FunctionLevelDual) else (b, None)
            t = bt if at is None else at if bt is None else at + bt
            return FunctionLevelDual(ap + bp, t)
        # (the loop's reads of x.shape and x.dtype)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"FunctionLevelDual has no rule for {func}")


def _forward_ad(f, x, v):
    from torch.autograd import forward_ad as fwAD
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, v))).tangent


def systems(x, v):
    """name -> zero-argument callable computing _sum_1000's tangent along v (or, for the
    passthrough, only its value)."""
    return {
        "passthrough (no tangent)": lambda: _sum_1000(Passthrough(x)).p,
        "minimal dual": lambda: _sum_1000(MinimalDual(x, v)).t,
        "minimal dual, __torch_function__": lambda: _sum_1000(FunctionLevelDual(x, v)).t,
        "torch_fwd eager": lambda: torch_fwd.jvp(_sum_1000, (x,), (v,), path="eager")[1],
        "torch.func.jvp": lambda: torch.func.jvp(_sum_1000, (x,), (v,))[1],
        "forward_ad": lambda: _forward_ad(_sum_1000, x, v),
        "primal": lambda: _sum_1000(x),
    }


def measure(n=1000, rounds=5, calls=3):
    """{name: (median, min, max) seconds per call}, rounds interleaved."""
    torch.manual_seed(0)
    x = torch.randn(n, dtype=torch.float64)
    v = torch.randn_like(x)
    runs = systems(x, v)
    with torch.no_grad():
        want = torch.func.jvp(_sum_1000, (x,), (v,))[1]
        for name in ("minimal dual", "minimal dual, __torch_function__", "torch_fwd eager", "forward_ad"):
            got = runs[name]()
            if not torch.allclose(got, want):
                raise AssertionError(f"eager_floor: {name} gives tangent {got.item()}, torch.func {want.item()}")
        samples = {name: [] for name in runs}
        for f in runs.values():
            f()
        for _ in range(rounds):
            for name, f in runs.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    f()
                samples[name].append((time.perf_counter() - t0) / calls)
    return {name: (statistics.median(s), min(s), max(s)) for name, s in samples.items()}


def markdown(results, n, rounds):
    base = results["torch.func.jvp"][0]
    ops = 2 * n
    lines = [f"# Eager floor: `_sum_1000` with n = {n} ({ops} ATen ops per call on a Dual)", "",
             f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; median of {rounds} interleaved rounds (min-max).", "",
             "| system | time per call | per ATen op | over torch.func.jvp |", "|---|---:|---:|---:|"]
    for name, (med, lo, hi) in results.items():
        lines.append(f"| {name} | {med * 1e3:.1f} ms [{lo * 1e3:.1f}-{hi * 1e3:.1f}] | {med / ops * 1e6:.1f} us | "
                     f"{med / base:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="folder for eager_floor.md (default: print only)")
    a = ap.parse_args(argv)
    if a.n < 1 or a.rounds < 1:
        raise SystemExit("eager_floor: --n and --rounds must be positive")
    md = markdown(measure(a.n, a.rounds), a.n, a.rounds)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "eager_floor.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    sys.exit(main())
