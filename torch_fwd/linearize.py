"""linearize: run the primal once, then push any number of tangents through its linear map.

The JVP graph (capture.to_aten + the forward-mode pass, as for make_jvp_graph) is split
in two: the nodes that depend on a tangent input form the linear *tangent part*; the rest,
the *primal part*, runs once at linearize time and hands the tangent part the values it
reads (the residuals: activations, saved statistics, factorisations). Each chunk size K
has its own pair of graphs (tangent shapes are traced); a new K runs that K's primal part
once more.
"""
from __future__ import annotations

import threading

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .api import _check
from .capture import to_aten
from .engine import building_for_autograd
from .dual import is_view
from .transform import build_jvp_graph

__all__ = ["linearize", "split_jvp_graph"]


def split_jvp_graph(gm: fx.GraphModule, n_primals: int, n_out: int):
    """Split a JVP graph ``gm(*primals, *tangents) -> (*outputs, *tangents)`` with
    ``n_out`` outputs into ``primal_gm(*primals) -> (*outputs, *residuals)`` and
    ``tangent_gm(*residuals, *tangents) -> (*tangent outputs)``."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    tangent_inputs = placeholders[n_primals:]
    linear = set(tangent_inputs)

    def spread():
        for n in g.nodes:
            if n.op not in ("placeholder", "output") and any(a in linear for a in n.all_input_nodes):
                linear.add(n)
    spread()
    # The tangent part runs again and again on the same residuals. Memory it writes into
    # (a buffer the function fills, a rule's zeros) is copied afresh on each call: the
    # written tensor's base is cloned there, and the views of it re-derived there, so
    # that writes through one view still reach the others.
    root = {}
    for n in g.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and is_view(n.target) \
                and n.args and isinstance(n.args[0], fx.Node):
            root[n] = root.get(n.args[0], n.args[0])
    written = set()
    for n in g.nodes:
        if n in linear and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            for a, arg in zip(n.target._schema.arguments, n.args):
                if a.alias_info is not None and a.alias_info.is_write and isinstance(arg, fx.Node):
                    written.add(root.get(arg, arg))
    moved = {n for n, r in root.items() if r in written and n not in linear}
    linear |= moved
    spread()
    (outputs,) = [n.args[0] for n in g.nodes if n.op == "output"]
    outputs = list(outputs)
    if any(isinstance(o, fx.Node) and o in linear for o in outputs[:n_out]):
        raise RuntimeError("torch_fwd internal error: a primal output depends on a tangent")
    # residuals: primal-part values the tangent part reads, and primal-part tangent
    # outputs (a zero tangent made without reading any tangent)
    residuals = []
    seen = set()
    for n in g.nodes:
        if n in linear and n.op != "placeholder":
            for a in n.all_input_nodes:
                if a not in linear and a not in seen:
                    seen.add(a)
                    residuals.append(a)
    for o in outputs[n_out:]:
        if isinstance(o, fx.Node) and o not in linear and o not in seen:
            seen.add(o)
            residuals.append(o)

    primal_graph = fx.Graph()
    env = {}
    for n in g.nodes:
        if n.op == "output" or n in linear:
            continue
        env[n] = primal_graph.node_copy(n, lambda a: env[a])
    primal_graph.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outputs[:n_out])
                        + tuple(env[r] for r in residuals))

    # (and a residual handed out as a tangent is copied: callers never share one)
    tangent_graph = fx.Graph()
    tenv = {}
    for i, r in enumerate(residuals):
        ph = tangent_graph.placeholder(f"residual_{i}")
        tenv[r] = tangent_graph.call_function(torch.ops.aten.clone.default, (ph,)) if r in written else ph
    for n in tangent_inputs:
        tenv[n] = tangent_graph.node_copy(n, lambda a: tenv[a])
    for n in g.nodes:
        if n in linear and n.op != "placeholder":
            tenv[n] = tangent_graph.node_copy(n, lambda a: tenv[a])
    results = []
    for o in outputs[n_out:]:
        if isinstance(o, fx.Node) and o not in linear:
            results.append(tangent_graph.call_function(torch.ops.aten.clone.default, (tenv[o],)))
        else:
            results.append(tenv[o] if isinstance(o, fx.Node) else o)
    tangent_graph.output(tuple(results))

    primal_gm = fx.GraphModule(gm, primal_graph)
    tangent_gm = fx.GraphModule(gm, tangent_graph)
    primal_gm.graph.eliminate_dead_code()
    tangent_gm.graph.eliminate_dead_code()
    primal_gm.recompile()
    tangent_gm.recompile()
    return primal_gm, tangent_gm


class _Linearized:
    """What ``linearize`` returns as ``jvp_fn``."""

    def __init__(self, flat_p, spec, aten_gm, out_spec, for_autograd):
        self._flat_p, self._spec = flat_p, spec
        self._aten_gm, self._out_spec = aten_gm, out_spec
        self._for_autograd = for_autograd
        self._per_k: dict = {}  # K -> (tangent_gm, residuals, active output mask)
        self._lock = threading.Lock()
        self.output = None

    def _for_chunk(self, k):
        with self._lock:
            entry = self._per_k.get(k)
            if entry is None:
                with building_for_autograd(self._for_autograd):
                    jg = build_jvp_graph(self._aten_gm, self._flat_p, [True] * len(self._flat_p), k)
                n_out = len(jg.active_outputs)
                primal_gm, tangent_gm = split_jvp_graph(jg.gm, len(self._flat_p), n_out)
                res = primal_gm(*self._flat_p)
                outs, residuals = list(res[:n_out]), list(res[n_out:])
                if self.output is None:
                    self.output = outs
                entry = self._per_k[k] = (tangent_gm, residuals, jg.active_outputs)
            return entry

    def __call__(self, *tangents, chunked=False):
        primals = pytree.tree_unflatten(self._flat_p, self._spec)
        _, flat_t, _, k = _check(primals, tangents, chunked, name="linearize's jvp_fn")
        tangent_gm, residuals, active_outputs = self._for_chunk(k)
        ts = [(t if chunked else t.unsqueeze(0)).contiguous() for t in flat_t]
        touts = iter(tangent_gm(*residuals, *ts))
        flat = []
        for o, active in zip(self.output, active_outputs):
            t = next(touts) if active else o.new_zeros((k,) + tuple(o.shape))
            flat.append(t if chunked else t.squeeze(0))
        return pytree.tree_unflatten(flat, self._out_spec)


def linearize(func, *primals):
    """``(func(*primals), jvp_fn)`` where ``jvp_fn(*tangents, chunked=False)`` is the JVP of
    ``func`` at ``primals``, evaluated without running the primal computation again (like
    ``torch.func.linearize``). ``func`` is traced once at these primals (make_fx), so it
    must be capturable: no data-dependent control flow. What the trace reads (globals,
    closures) is read now, as for torch.func.linearize.
    """
    if not callable(func):
        raise TypeError(f"linearize: func must be callable, got {type(func).__name__}")
    flat_p, _, spec, _ = _check(primals, primals, False, name="linearize")  # floating tensors
    box = {}

    def flat_fn(*flat):
        out = func(*pytree.tree_unflatten(list(flat), spec))
        leaves, box["spec"] = pytree.tree_flatten(out)
        for j, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"linearize: func must return tensors (or pytrees of them); output leaf {j} "
                                f"is a {type(x).__name__}")
        return tuple(leaves)

    try:
        aten_gm = to_aten(flat_fn, flat_p, functionalize=False)
    except TypeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"linearize: the function could not be traced at these primals ({type(e).__name__}: "
                           f"{e}). linearize needs a capturable function; torch_fwd.jvp runs any function") from e
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in flat_p)
    lin = _Linearized(flat_p, spec, aten_gm, box["spec"], grad)
    lin._for_chunk(1)  # the primal part runs here, once
    return pytree.tree_unflatten(list(lin.output), box["spec"]), lin
