"""laplacian: the forward Laplacian of a scalar field (collapsed second-order Taylor mode).

Every value of the traced ATen graph carries, besides itself, its d directional derivatives
V (one per coordinate, chunk dimension first: our tangent convention) and one collapsed
second-order term L = sum_i D^2 f[e_i, e_i]. Through an op f with first derivative J:

    V_out = J V,    L_out = J L + sum_i f''[V_i, V_i]

J V and J L come from the rule table in one JVP with K = d + 1. The second-order term is
zero for ops linear in what moves; 2 sum_i B(V_a_i, V_b_i) for a bilinear op with both
factors moving (mul, mm, addmm, bmm, convolution); f''(x) * sum_i V_i^2 for a pointwise op
(its second partials from a nested jvp of the op on ones); otherwise a nested jvp of the
op along blocks of directions (exact, d * block times the op). No d x d Hessian is formed:
cost grows like d, not d^2 (Li et al., "Forward Laplacian", 2023).
"""
from __future__ import annotations

import itertools
import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import registry
from .capture import to_aten
from .engine import _get, _substitute, jvp_op  # (i, j) argument slots, as the fallbacks use

__all__ = ["laplacian"]

aten = torch.ops.aten

# ops linear in all their tensor arguments jointly: no second-order term whatever moves
LINEAR = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default, aten.rsub.Scalar,
    aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.cumsum.default,
    aten.cat.default, aten.stack.default, aten.clone.default, aten._to_copy.default, aten.alias.default,
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.select.int, aten.slice.Tensor, aten.index_select.default, aten.index.Tensor,
    aten.flip.default, aten.roll.default, aten.repeat.default, aten.diagonal.default, aten.narrow.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.mul.Scalar, aten.div.Scalar,
    aten.constant_pad_nd.default, aten.gather.default, aten.trace.default, aten.lift_fresh_copy.default,
    aten.avg_pool2d.default, aten.sum.dim_IntList, aten.copy.default,
}
# bilinear in two arguments (positions): the product of their V's, summed over directions
BILINEAR = {
    aten.mul.Tensor: (0, 1, lambda Va, Vb, p: Va * Vb),
    aten.mm.default: (0, 1, lambda Va, Vb, p: Va @ Vb),
    aten.bmm.default: (0, 1, lambda Va, Vb, p: Va @ Vb),
    aten.matmul.default: (0, 1, lambda Va, Vb, p: Va @ Vb),
    aten.dot.default: (0, 1, lambda Va, Vb, p: (Va * Vb).sum(-1)),
    aten.mv.default: (0, 1, lambda Va, Vb, p: (Va @ Vb.unsqueeze(-1)).squeeze(-1)),
    aten.addmm.default: (1, 2, lambda Va, Vb, p: p[4] * (Va @ Vb)),
    aten.baddbmm.default: (1, 2, lambda Va, Vb, p: p[4] * (Va @ Vb)),
}
# a linear op's arguments that are not factors: moving alone, the op is linear in them
_DIVISOR = {aten.div.Tensor: 1}

_GENERIC_BLOCK = 8


def _mark(x):
    return isinstance(x, _Taylor)


class _Taylor:
    """A value with its d first-order directions V (d, *shape) and collapsed L (*shape)."""
    __slots__ = ("value", "V", "L")

    def __init__(self, value, V, L):
        self.value, self.V, self.L = value, V, L


def _active_positions(args):
    pos = []
    for i, a in enumerate(args):
        if _mark(a):
            pos.append((i, None))
        elif isinstance(a, (list, tuple)):
            pos.extend((i, j) for j, x in enumerate(a) if _mark(x))
    return pos


def _value(a):
    if _mark(a):
        return a.value
    if isinstance(a, (list, tuple)) and any(_mark(x) for x in a):
        return type(a)(x.value if _mark(x) else x for x in a)
    return a


def _values(args):
    return tuple(_value(a) for a in args)


def _sum_over(f, args, positions, blocks):
    """sum_i D^2 f[v_i, v_i] by nested jvps of f along blocks of directions (exact)."""
    from .api import jvp
    acts = tuple(_get(args, p).value for p in positions)
    d = _get(args, positions[0]).V.shape[0]
    total = None

    def call(*z):
        return registry.call_op(f, _substitute(_values(args), positions, z))
    for start in range(0, d, blocks):
        V = tuple(_get(args, p).V[start:start + blocks] for p in positions)

        def first(*z):
            return jvp(call, z, V, chunked=True, path="eager")[1]
        M = jvp(first, acts, V, chunked=True, path="eager")[1]  # (outer, inner, *out)
        diag = pytree.tree_map(lambda m: m.diagonal(dim1=0, dim2=1).sum(-1), M)
        total = diag if total is None else pytree.tree_map(torch.add, total, diag)
    return total


def _pointwise_second(op, args, positions, out):
    """f''-terms of a pointwise op: sum over moving pairs (a, b) of f_ab * sum_i V_a_i V_b_i,
    each second partial from a nested jvp of the op with unit tangents."""
    from .api import jvp
    acts = tuple(_get(args, p).value for p in positions)

    def call(*z):
        return registry.call_op(op, _substitute(_values(args), positions, z))
    total = None
    for a, b in itertools.combinations_with_replacement(range(len(positions)), 2):
        ea = tuple(torch.ones_like(x) if i == a else torch.zeros_like(x) for i, x in enumerate(acts))
        eb = tuple(torch.ones_like(x) if i == b else torch.zeros_like(x) for i, x in enumerate(acts))

        def first(*z):
            return jvp(call, z, ea, path="eager")[1]
        fab = jvp(first, acts, eb, path="eager")[1]
        Va, Vb = _get(args, positions[a]).V, _get(args, positions[b]).V
        d = Va.shape[0]
        shape = (d,) + tuple(out.shape)
        term = fab * (Va.expand(shape) * Vb.expand(shape) if Va.dim() == len(shape) else
                      _broadcast(Va, shape) * _broadcast(Vb, shape)).sum(0)
        total = term * (1 if a == b else 2) if total is None else total + term * (1 if a == b else 2)
    return total


def _broadcast(V, shape):
    # V is (d, *input_shape); the input broadcasts against the output's shape[1:]
    extra = len(shape) - V.dim()
    return V.reshape((V.shape[0],) + (1,) * extra + tuple(V.shape[1:])).expand(shape)


def _second_order(op, args, positions, out):
    if op in LINEAR:
        return None
    if op in _DIVISOR and all(p[0] != _DIVISOR[op] for p in positions):
        return None  # only the numerator moves
    if op in BILINEAR:
        ia, ib, prod = BILINEAR[op]
        moving = {p[0] for p in positions}
        if moving <= ({ia, ib} | ({0} if op in (aten.addmm.default, aten.baddbmm.default) else set())):
            if not (ia in moving and ib in moving):
                return None  # one factor moves: linear
            Va, Vb = args[ia].V, args[ib].V
            return 2 * prod(Va, Vb, _values(args)).sum(0)
    if isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags and isinstance(out, torch.Tensor):
        return _pointwise_second(op, args, positions, out)
    return _sum_over(op, args, positions, _GENERIC_BLOCK)


def _run_op(op, args):
    positions = _active_positions(args)
    if not positions:
        return registry.call_op(op, args)
    d = _get(args, positions[0]).V.shape[0]
    primals = _values(args)
    # J V and J L in one JVP (K = d + 1); L is None (zero) until a second-order term
    # appears, which spares concatenating the input's expanded identity
    with_L = any(_get(args, p).L is not None for p in positions)

    def stacked(t):
        if not with_L:
            return t.V
        L = t.L if t.L is not None else torch.zeros_like(t.value)
        return torch.cat([t.V, L.unsqueeze(0)])
    empty = tuple([None] * len(a) if isinstance(a, (list, tuple)) else None for a in args)
    tangents = _substitute(empty, positions, [stacked(_get(args, p)) for p in positions])
    out, tout = jvp_op(op, primals, tangents)
    second = _second_order(op, args, positions, out)

    def pack(o, t, s):
        if not isinstance(o, torch.Tensor) or not (o.is_floating_point() or o.is_complex()) or t is None:
            return o  # does not move
        L = t[d] if with_L else None
        if s is not None:
            L = s if L is None else L + s
        return _Taylor(o, t[:d], L)
    if isinstance(out, (tuple, list)):
        touts = tout if tout is not None else [None] * len(out)
        seconds = second if second is not None else [None] * len(out)
        return type(out)(pack(o, t, s) for o, t, s in zip(out, touts, seconds))
    return pack(out, tout, second)


def _interpret(gm: fx.GraphModule, inputs):
    env = {}
    placeholders = iter(inputs)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(placeholders)
        elif n.op == "get_attr":
            env[n] = getattr(gm, n.target)
        elif n.op == "call_function":
            args = pytree.tree_map_only(fx.Node, lambda a: env[a], n.args)
            kwargs = pytree.tree_map_only(fx.Node, lambda a: env[a], n.kwargs)
            if n.target is operator.getitem:
                env[n] = args[0][args[1]]
            elif isinstance(n.target, torch._ops.OpOverload):
                if n.target is aten.detach.default:
                    a = args[0]
                    env[n] = a.value if _mark(a) else registry.call_op(n.target, (a,))
                else:
                    env[n] = _run_op(n.target, registry.normalize(n.target, args, kwargs))
            else:
                raise NotImplementedError(f"laplacian: unexpected node {n.format_node()}")
        elif n.op == "output":
            return pytree.tree_map_only(fx.Node, lambda a: env[a], n.args[0])
    raise RuntimeError("laplacian: graph without output")


def _guarded(func, x, V):
    """Through jvp's dynamo-guarded capture of ``func`` (reused while its guards hold),
    each captured ATen graph interpreted with Taylor values; None where that cannot serve
    (a graph break, an output dynamo builds outside the graph)."""
    from .api import _capture_for
    from .capture import CaptureFailed

    def interpret(gm, args, ch):
        outs = _interpret(gm, [_Taylor(a, V, None) if isinstance(a, torch.Tensor) and id(a) in ch.tangents
                               else a for a in args])
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        for o in outs:
            if _mark(o):
                ch.results[id(o.value)] = o
        return [o.value if _mark(o) else o for o in outs]
    try:
        out, ch = _capture_for(func).run((x,), [x], [V], V.shape[0],
                                              lambda: ("laplacian", tuple(x.shape), x.dtype, x.stride()),
                                              interpret=interpret)
    except CaptureFailed:
        return None
    if not isinstance(out, torch.Tensor) or ch.results.get(id(out)) is None:
        return None
    return ch.results[id(out)]


def _traced_once(func, x, V):
    try:
        gm = to_aten(func, [x])
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"laplacian: func could not be traced ({type(e).__name__}: {e}); it must be "
                           f"capturable by make_fx (no data-dependent control flow)") from e
    return _interpret(gm, [_Taylor(x, V, None)])


def laplacian(func, x, *, batch_dims: int = 0, return_gradient: bool = False):
    """The Laplacian of ``func`` with respect to ``x``: for every element of ``func(x)``,
    the sum of its second derivatives along each coordinate of its point.

    ``batch_dims``: the leading dims of ``x`` index independent points (``func`` must not
    mix them, e.g. no batch norm across points); the remaining dims are the d coordinates,
    and the output's leading dims must be the same batch dims. With ``batch_dims=0`` all of
    ``x`` is one point. Returns the Laplacian, shaped like ``func(x)``, and with
    ``return_gradient=True`` also the gradient, shaped ``(*func(x).shape, *coordinates)``.
    ``func`` is captured as for ``jvp``'s graph path (dynamo, guarded and reused; make_fx
    where dynamo cannot): it must have no data-dependent control flow.
    """
    if not callable(func):
        raise TypeError(f"laplacian: func must be callable, got {type(func).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"laplacian: x must be a floating tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(batch_dims, int) or not 0 <= batch_dims < max(x.dim(), 1):
        raise ValueError(f"laplacian: batch_dims must be an int in [0, {max(x.dim() - 1, 0)}] for x of "
                         f"shape {tuple(x.shape)}, got {batch_dims!r}")
    coords = tuple(x.shape[batch_dims:])
    d = 1
    for s in coords:
        d *= s

    # directions: the identity over the coordinates, the same for every point (expanded)
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape((d,) + (1,) * batch_dims + coords)
    V = eye.expand((d,) + tuple(x.shape))
    with torch.no_grad():
        out = _guarded(func, x, V)
        if out is None:
            out = _traced_once(func, x, V)
    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
    if isinstance(out, (tuple, list)):
        raise TypeError("laplacian: func must return one tensor")
    if not _mark(out):  # does not depend on x
        value = out
        lap = torch.zeros_like(value)
        grad = torch.zeros(tuple(value.shape) + coords, dtype=value.dtype, device=value.device)
    else:
        value, lap = out.value, out.L if out.L is not None else torch.zeros_like(out.value)
        grad = out.V.movedim(0, -1).reshape(tuple(value.shape) + coords)
    if tuple(value.shape[:batch_dims]) != tuple(x.shape[:batch_dims]):
        raise ValueError(f"laplacian: with batch_dims={batch_dims} the output's leading dims must be x's "
                         f"{tuple(x.shape[:batch_dims])}; got an output of shape {tuple(value.shape)}")
    return (lap, grad) if return_gradient else lap
