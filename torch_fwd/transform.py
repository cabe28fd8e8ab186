"""The forward-mode pass: an ATen fx graph -> its JVP graph.

The pass interprets the ATen graph with ``Dual`` values under ``DualMode`` while
``make_fx`` records what runs. The rules are therefore literally the eager path's; what
``make_fx`` records is the JVP graph:

- activity analysis: a node whose inputs carry no tangent runs its primal op only (the
  symbolic zero ``None`` never becomes a tensor), so ``W2 @ tanh(W1 @ x)`` differentiated
  along x holds two tangent matmuls, none against a weight's zero tangent;
- dead-code elimination (fx's, which keeps mutating ops) drops unused tangents;
- common-subexpression elimination (``torch.fx.passes.dialect.common.cse_pass``), with
  random and mutating ops banned, merges work a rule recomputed.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from . import bindings, scripted, engine
from .dual import Dual, DualMode, entered_level, is_view, unwrap_tree
from .tangent import zeros_tangent

__all__ = ["JVPGraph", "build_jvp_graph"]

aten = torch.ops.aten


class _SourceInterpreter(fx.Interpreter):
    """Runs a graph node by node, pointing errors at the user's source line."""

    def run_node(self, n):
        prev = engine._source_hint.line
        engine._source_hint.line = _stack_line(n)
        try:
            if is_stop_gradient(n):
                # the user's detach(), lowered to an alias where torch decomposes detach
                # (2.14): run as detach, which drops the tangent (the node's meta current,
                # so that what make_fx records for it keeps the mark: _build_jvp_graph)
                with fx.traceback.set_current_meta(n):
                    return torch.ops.aten.detach.default(self.env[n.args[0]])
            return super().run_node(n)
        finally:
            engine._source_hint.line = prev


STOP_GRADIENT = {"torch_fwd": "stop_gradient"}


def is_stop_gradient(n: fx.Node) -> bool:
    """Whether an ATen node is the lowering of a ``detach()`` (or ``.data``) of the user's:
    capture.to_aten marks them (``node.meta["custom"]``, which make_fx carries to the
    nodes it records), since the lowering itself may be an ``aten.alias``."""
    return n.op == "call_function" and n.meta.get("custom") == STOP_GRADIENT and bool(n.args) \
        and isinstance(n.args[0], fx.Node)


def _stack_line(n: fx.Node) -> str | None:
    st = n.meta.get("stack_trace")
    if not st:
        return None
    lines = [ln for ln in st.strip().splitlines() if ln.strip()]
    # the innermost user frame: the last 'File' line outside torch and torch_fwd, with its code
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].lstrip()
        if ln.startswith("File") and not engine.is_library_frame(ln):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].lstrip().startswith("File") else ""
            return f"{ln}\n    {code}" if code else ln
    return None



_GRAD_MODE_SWITCHES = {torch._C._set_grad_enabled}

#: ``aten_gm.meta`` key capture.to_aten sets: whether the function turned grad mode on or
#: off inside (``torch.no_grad()`` around part of it). The ATen graph has lost the switch:
#: a JVP graph built from it is right in value, but autograd differentiating it would
#: differentiate the part the user excluded, so build_jvp_graph refuses it for autograd.
SWITCHES_GRAD_MODE = "torch_fwd_switches_grad_mode"


def switches_grad_mode(gm: fx.GraphModule) -> bool:
    """Whether a graph dynamo captured switches grad mode inside (see SWITCHES_GRAD_MODE)."""
    return any(n.op == "call_function" and n.target in _GRAD_MODE_SWITCHES for n in gm.graph.nodes)


def mutated_placeholders(gm: fx.GraphModule) -> set[int]:
    """Indices of placeholders an op writes into (input mutations after functionalization),
    directly or through a view of them (``alias(x).copy_(...)`` survives functionalization
    where an op, like native_batch_norm, mutates without declaring it)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    base = {n: i for i, n in enumerate(phs)}
    out = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema = n.target._schema
        for a, arg in zip(schema.arguments, n.args):
            if a.alias_info is not None and a.alias_info.is_write and isinstance(arg, fx.Node) and arg in base:
                out.add(base[arg])
        if n.args and isinstance(n.args[0], fx.Node) and n.args[0] in base and is_view(n.target):
            base[n] = base[n.args[0]]  # a view of an input: writes into it reach the input
    return out


@dataclasses.dataclass
class JVPGraph:
    """A JVP graph: ``gm(*primals, *active_tangents)`` returns
    ``(*outputs, *active_output_tangents, *mutated_input_tangents)``."""
    gm: fx.GraphModule
    active_inputs: tuple[bool, ...]
    active_outputs: tuple[bool, ...]
    mutated_inputs: tuple[int, ...]
    # what runs: for an fx graph, its copy calling Python bindings (bindings.py), made on
    # the first call; a compiled graph (Inductor's callable) runs as it is
    _forward: object = dataclasses.field(default=None, init=False, repr=False, compare=False)
    # set by the graph path's cache for graphs it calls again and again: from the second
    # call on, the graph runs as a TorchScript trace where one can be trusted (scripted.py;
    # not on the first: a graph run once, as _traced_once's, would pay for nothing)
    trace_when_reused: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)
    _to_trace: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        # (every output with a tangent and no input mutated: the results split in two)
        self._every_output_active = all(self.active_outputs) and not self.mutated_inputs
        self._every_input_active = all(self.active_inputs)

    def __call__(self, primals, tangents):
        """primals: all graph inputs; tangents: one per input (None: zero). Returns
        (outputs, output tangents with None for zero, {input index: new tangent})."""
        args = [*primals, *tangents] if self._every_input_active else \
            [*primals, *[t for t, a in zip(tangents, self.active_inputs) if a]]
        forward = self._forward
        if forward is None:
            if isinstance(self.gm, fx.GraphModule):
                forward = self._forward = bindings.runner(self.gm)
                self._to_trace = self.trace_when_reused and scripted.traceable(self.gm)
            else:
                forward = self._forward = self.gm
            res = forward(*args)
        elif self._to_trace:
            self._to_trace = False
            traced, res = scripted.traced_runner(self.gm, forward, args)
            if traced is not None:
                self._forward = traced
        else:
            res = forward(*args)
        n_outputs = len(self.active_outputs)
        if self._every_output_active:
            return res[:n_outputs], res[n_outputs:], {}
        outs = list(res[:n_outputs])
        it = iter(res[n_outputs:])
        touts = [next(it) if a else None for a in self.active_outputs]
        mutated = {i: next(it) for i in self.mutated_inputs}
        return outs, touts, mutated


def _cse(gm: fx.GraphModule) -> fx.GraphModule:
    from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops
    banned = set(get_CSE_banned_ops())
    for n in gm.graph.nodes:
        t = n.target
        # batch_norm updates running statistics without saying so in its schema
        if isinstance(t, torch._ops.OpOverload) and (t._schema.is_mutable or "batch_norm" in t.name()):
            banned.add(t.overloadpacket)
    return CSEPass(banned).call(gm).graph_module


def build_jvp_graph(aten_gm: fx.GraphModule, example_inputs, active_inputs, chunk: int,
                    zeros_for_inactive: bool = False, decompositions=None) -> JVPGraph:
    """Trace the JVP of ``aten_gm`` (a functional ATen graph, e.g. from capture.to_aten).

    ``example_inputs`` may be real or fake tensors; tracing uses fake tensors. Raises
    whatever the rules raise (NoRuleError names the op and the user's source line).
    ``decompositions``: a decomposition table make_fx applies to what it records (the
    rules see the graph's ops as they are; the ops the rules emit are decomposed), e.g.
    Inductor's, for a graph Inductor compiles without re-tracing it (backend.py).
    """
    from .capture import TRACE_LOCK, ensure_compiler_imported
    if engine.for_autograd() and aten_gm.meta.get(SWITCHES_GRAD_MODE):
        raise NotImplementedError(
            "torch_fwd: the function turns grad mode on or off inside (torch.no_grad()), which a JVP "
            "graph that autograd will differentiate cannot keep: path='auto' and 'eager' run it eagerly "
            "(make_jvp_graph: for_autograd=False where nothing back-propagates)")
    ensure_compiler_imported()
    with TRACE_LOCK:
        return _build_jvp_graph(aten_gm, example_inputs, active_inputs, chunk, zeros_for_inactive,
                                decompositions)


def _build_jvp_graph(aten_gm, example_inputs, active_inputs, chunk, zeros_for_inactive, decompositions):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    active_inputs = tuple(bool(a) for a in active_inputs)
    mutated = sorted(mutated_placeholders(aten_gm))
    record: dict = {}

    def jvp_fn(*flat):
        with entered_level() as level:
            return _jvp_fn(level, *flat)

    def _jvp_fn(level, *flat):
        n = len(active_inputs)
        primals, tans = flat[:n], iter(flat[n:])
        duals = []
        for i, (p, a) in enumerate(zip(primals, active_inputs)):
            if not a:
                # an input without a tangent (a parameter, buffer or global) stays a plain
                # tensor: as in the eager path, a tangent written into it is refused
                duals.append(p)
                continue
            t = next(tans)
            if i in mutated:
                t = t.clone()  # never write into the caller's tangent
            duals.append(Dual(p, t, chunk=chunk, level=level))
        with DualMode(chunk, level):
            outs = _SourceInterpreter(aten_gm).run(*duals)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        prim, touts = unwrap_tree(outs, level)
        if zeros_for_inactive:
            touts = [t if t is not None or not isinstance(p, torch.Tensor) else zeros_tangent(p, chunk)
                     for t, p in zip(touts, prim)]
        record["active_outputs"] = tuple(t is not None for t in touts)
        mut = [duals[i].tangent if isinstance(duals[i], Dual) and duals[i]._level == level else None
               for i in mutated]
        # a mutated input whose new value has no tangent gets an explicit zero
        mut = [t if t is not None else zeros_tangent(duals[i], chunk) for t, i in zip(mut, mutated)]
        return tuple(prim) + tuple(t for t in touts if t is not None) + tuple(mut)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x):
        if isinstance(x, torch.Tensor):
            return fake_mode.from_tensor(x)
        return x

    # Traced without grad: what autograd records is decided when the graph runs, not here.
    # Without __torch_function__: the ATen graph holds what a user's torch-function mode
    # did when it was captured; its ops seen by that mode again would apply it twice.
    # (node meta preserved: the ops recorded for a user's detach() carry its mark)
    with fake_mode, torch.no_grad(), torch._C.DisableTorchFunction(), fx.traceback.preserve_node_meta():
        fake_primals = [fake(x) for x in example_inputs]
        # tangents are traced contiguous; callers pass them contiguous (api.py ensures it)
        fake_tangents = [torch.empty((chunk,) + tuple(x.shape), dtype=x.dtype, device=x.device)
                         for x, a in zip(fake_primals, active_inputs) if a]
        gm = make_fx(jvp_fn, decompositions, tracing_mode="real")(*fake_primals, *fake_tangents)
    for n in gm.graph.nodes:
        # a detach make_fx recorded as an alias (torch 2.14) would let autograd through
        if n.op == "call_function" and n.target is torch.ops.aten.alias.default \
                and n.meta.get("custom") == STOP_GRADIENT:
            n.target = torch.ops.aten.detach.default
    gm.graph.eliminate_dead_code()
    gm = _cse(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return JVPGraph(gm, active_inputs, record["active_outputs"], tuple(mutated))


def unbatched_tangents(jg):
    """``jg`` (traced with K = 1) taking each tangent without its leading K and giving each
    tangent without it: the K dimension added and removed inside the graph, where Inductor
    makes both free (an input read in place, an output allocated in its final shape), not
    around it, where each is a view made on every call -- for a small function most of
    what a compiled jvp costs beyond torch's own (``simple_mlp``: seven views a call).
    The graph path, which runs the graph op by op, then removes the K it can
    (``drop_unit_k``)."""
    aten = torch.ops.aten
    gm = jg.gm  # (built for this one use, a compile or the graph path's cache: rewritten in place)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[len(jg.active_inputs):]:
        with graph.inserting_after(placeholders[-1]):
            batched = graph.call_function(aten.unsqueeze.default, (ph, 0))
        ph.replace_all_uses_with(batched, delete_user_cb=lambda u: u is not batched)
        if "val" in ph.meta:  # (Inductor's passes read each node's fake value)
            batched.meta["val"] = ph.meta["val"]
            ph.meta["val"] = ph.meta["val"].squeeze(0)
    output = next(n for n in graph.nodes if n.op == "output")
    outs = list(output.args[0])
    with graph.inserting_before(output):
        for i in range(len(jg.active_outputs), len(outs)):
            single = graph.call_function(aten.squeeze.dim, (outs[i], 0))
            if "val" in outs[i].meta:
                single.meta["val"] = outs[i].meta["val"].squeeze(0)
            outs[i] = single
    output.args = (tuple(outs),)
    graph.lint()
    gm.recompile()
    return dataclasses.replace(jg, gm=gm)


def _unsqueezed(n):
    """The tensor y of a node ``unsqueeze(y, 0)``, else None."""
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.ops.aten.unsqueeze.default \
            and n.args[1] == 0:
        return n.args[0]
    return None


def _rank(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else None


def drop_unit_k(jg):
    """An unbatched JVP graph (``unbatched_tangents``) without the K = 1 dimension where
    rewriting can remove it: ``unsqueeze(y, 0)`` is moved below the pointwise ops and sums
    that read it, and cancels against the ``select(., 0, 0)`` of a product's rule
    (linalg.product_tangent) or the ``squeeze`` at an output. The graph path runs a graph
    op by op, and each of those views is ~1 us of a call (``simple_mlp``: ten of them
    around six products). Only what is exact moves: a pointwise op whose other tensors
    broadcast without reaching dim 0, a sum not over dim 0. The fake values are then
    propagated again (bindings.py checks its bindings on them)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    aten = torch.ops.aten
    gm = jg.gm
    graph = gm.graph
    changed = False
    for n in list(graph.nodes):
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        first = n.args[0] if n.args else None
        y = _unsqueezed(first)
        if y is not None and ((n.target is aten.select.int and tuple(n.args[1:]) == (0, 0))
                              or (n.target is aten.squeeze.dim and n.args[1] == 0)):
            n.replace_all_uses_with(y)
            changed = True
            continue
        out_rank = _rank(n)
        if out_rank is None or n.target._schema.is_mutable:
            continue
        if torch.Tag.pointwise in n.target.tags:
            tensors = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node)]
            # (a 0-d y would take part in type promotion as a scalar, where its unsqueezed
            # form counts as a tensor: only y of rank 1 or more is lifted)
            lifted = [a for a in tensors if _unsqueezed(a) is not None and _rank(a) == out_rank > 1]
            others = [a for a in tensors if a not in lifted]
            if not lifted or any(_rank(a) is None or _rank(a) >= out_rank for a in others):
                continue

            def strip(a):
                return _unsqueezed(a) if isinstance(a, fx.Node) and a in lifted else a
            args, kwargs = tuple(strip(a) for a in n.args), {k: strip(v) for k, v in n.kwargs.items()}
        elif n.target is aten.sum.dim_IntList and y is not None and n.args[1]:
            r = _rank(first)
            dims = [d % r for d in n.args[1]]
            if 0 in dims:
                continue
            args, kwargs = (y, [d - 1 for d in dims], *n.args[2:]), dict(n.kwargs)
        else:
            continue
        with graph.inserting_before(n):
            inner = graph.call_function(n.target, args, kwargs)
            outer = graph.call_function(aten.unsqueeze.default, (inner, 0))
        # (stand-ins for the ranks read further down; propagated exactly below)
        inner.meta["val"], outer.meta["val"] = n.meta["val"][0], n.meta["val"]
        n.replace_all_uses_with(outer)
        changed = True
    if not changed:
        return jg
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    placeholders = [n.meta["val"] for n in graph.nodes if n.op == "placeholder"]
    mode = torch._guards.detect_fake_mode(placeholders)
    with torch._C.DisableTorchFunction():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*placeholders)
    return jg

