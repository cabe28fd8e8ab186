"""Running a JVP graph in TorchScript's interpreter: one C++ call for the whole graph.

The bindings runner (bindings.py) still makes one Python call per op, and every
intermediate becomes a Python tensor object; for the small graphs the graph path serves
(an MLP's JVP is ~20 ops of a few microseconds each) that is most of the time.
``torch.jit.trace`` records the ATen ops a graph runs into a TorchScript graph, which
runs them from C++ with nothing in Python between them (~1 us per op saved, more for
ops with many arguments; its call costs ~5 us more than a Python function's, so short
graphs keep the bindings).

Tracing records what ran, not what the code says, so it is used only where the two
provably agree, decided once per graph:

- every node an ``OpOverload`` with static shapes (the graph path's graphs: dynamo
  captures with ``dynamic=False``), or ``operator.getitem`` on a multi-output op; no
  higher-order ops, whose Python bodies a trace would flatten;
- no op that mutates (tracing runs the graph: a mutation would happen once more) and no
  random op (the trace and its check would draw numbers the caller never sees);
- no ``TracerWarning`` while tracing (a tensor turned into a Python value, a trace that
  depends on data), and the traced function's outputs on the tracing call equal the
  graph's own run bitwise, with the same dtypes, shapes and strides.

Any doubt keeps the bindings runner. Traced graphs run with the graph executor's
optimisations off (a thread-local switch, set around each call): no profiling runs, no
fusion, no autodiff graphs -- the recorded ops as they are. TorchScript is deprecated in
favour of torch.compile/torch.export, neither of which runs a graph without compiling
it; if ``torch.jit.trace`` goes away or fails, the bindings runner is what runs.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

__all__ = ["MIN_OPS", "traceable", "traced_runner"]

#: fewer ops than this and the bindings runner is faster (measured on these CPUs: the
#: interpreter's call costs ~5 us more, each op ~1 us less)
MIN_OPS = 8


def _static(val) -> bool:
    if isinstance(val, torch.Tensor):
        return all(type(s) is int for s in val.shape)
    if isinstance(val, (list, tuple)):
        return all(_static(v) for v in val)
    return False


def traceable(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a graph a trace reproduces exactly (module docstring)."""
    n_ops = 0
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            if n.op == "placeholder" and not isinstance(n.meta.get("val"), torch.Tensor):
                return False
            continue
        if n.op != "call_function":
            return False
        if n.target is operator.getitem:
            continue
        op = n.target
        if not isinstance(op, torch._ops.OpOverload) or not _static(n.meta.get("val")):
            return False
        if op._schema.is_mutable or torch.Tag.nondeterministic_seeded in op.tags:
            return False
        n_ops += 1
    return n_ops >= MIN_OPS


def _same(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride() or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def traced_runner(gm: fx.GraphModule, reference, args):
    """(a function running ``gm`` through its TorchScript trace or None where the trace
    cannot be trusted, ``reference(*args)``). ``reference`` runs the graph as it would
    otherwise run; ``args`` are the real inputs of this call (the trace runs on them)."""
    if not all(type(a) is torch.Tensor for a in args) or torch._C._len_torch_dispatch_stack():
        return None, reference(*args)
    get_optimize, set_optimize = torch._C._get_graph_executor_optimize, torch._C._set_graph_executor_optimize
    forward = gm.forward

    def graph_fn(*a):
        return tuple(forward(*a))

    prev = get_optimize()
    set_optimize(False)
    try:
        with warnings.catch_warnings(record=True) as caught, torch._C.DisableTorchFunction():
            warnings.simplefilter("always")
            traced = torch.jit.trace(graph_fn, tuple(args), check_trace=False, strict=False)
            got = traced(*args)
    except Exception:  # noqa: BLE001 - anything a trace cannot do keeps the bindings
        return None, reference(*args)
    finally:
        set_optimize(prev)
    want = reference(*args)
    if any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
        return None, want
    if not isinstance(got, tuple) or len(got) != len(want) or not all(_same(g, w) for g, w in zip(got, want)):
        return None, want

    def run(*a):
        prev = get_optimize()
        set_optimize(False)
        try:
            return traced(*a)
        finally:
            set_optimize(prev)
    run.traced = traced  # (for inspection and tests)
    return run, want
