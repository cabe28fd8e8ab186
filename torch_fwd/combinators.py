"""Combinators that make most rules one line (after JAX's defjvp / deflinear / defbilinear
and HIPS autograd's numpy_jvps).

Each returns a rule ``rule(primals, tangents) -> (out, tangent_out)`` in the interface of
``registry``; ``rules/`` registers them with ``registry.library_rule``.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from . import triton_kernels
from .engine import for_autograd
from .registry import call_op
from .tangent import align, tadd

__all__ = ["unary", "elementwise", "zero", "linear", "linear_vmap", "decompose_with", "with_kernel", "shift_dim",
           "shift_dims"]


def unary(op, deriv):
    """y = op(x, *params); dy = deriv(x, y, *params) * dx. ``deriv`` may reuse y (exp: y)."""
    return elementwise(op, lambda x, *rest: deriv(x, rest[-1], *rest[:-1]))


def fused(op, backward):
    """y = op(x, *params); dy = backward(dx, x, y, *params), one of PyTorch's fused
    derivative kernels (gelu_backward, ...): one op where f'(x) * dx is several."""
    def rule(p, t):
        y = call_op(op, p)
        return y, None if t[0] is None else backward(t[0], p[0], y, *p[1:])
    rule.__name__ = f"fused_rule_{op}"
    return rule


def elementwise(op, *derivs):
    """y = op(a, b, ...); dy = sum_i deriv_i(*primals, y) * da_i with broadcasting.

    ``derivs[i]`` is the partial with respect to argument i (None: not differentiable).
    """
    def rule(p, t):
        y = call_op(op, p)
        nd = y.dim()
        out = None
        for i, d in enumerate(derivs):
            ti = t[i] if i < len(t) else None
            if ti is None or d is None:
                continue
            ti, di = align(ti, nd), d(*p, y)
            if out is not None and isinstance(di, torch.Tensor) and out.dtype == ti.dtype == di.dtype \
                    and not triton_kernels.under_inductor():
                # the running sum and this product in one op: one pass over the output, not
                # two (Inductor fuses the sum anyway, and lowers addcmul with a multiply by
                # its value even where that is 1: one instruction per element more)
                out = torch.addcmul(out, ti, di)
            else:
                out = tadd(out, ti * di)
        return y, out
    rule.__name__ = f"elementwise_rule_{op}"
    return rule


def zero(op):
    """Piecewise-constant or integer-valued ops: the derivative is zero where it exists."""
    def rule(p, t):
        return call_op(op, p), None
    rule.__name__ = f"zero_rule_{op}"
    return rule


def shift_dim(d: int, ndim: int) -> int:
    """A primal dim index (possibly negative) as the index of that dim in a tangent."""
    return d % max(ndim, 1) + 1


def shift_dims(dims, ndim: int):
    return [shift_dim(d, ndim) for d in dims]


def linear(op, tangent_fn, homogeneous=True):
    """Ops linear in their first argument: dy = tangent_fn(dx, *primals) where tangent_fn
    applies the op to a chunked tangent (usually with a shifted dim, one line).

    A 0-d primal has dims only by convention (dim 0 or -1 of a scalar); for a homogeneous op
    (dy = op(dx)) its tangent (K,) goes through torch.vmap of the op instead, whose batching
    rules know that convention. Affine ops (``x + 1``: dy = dx, not op(dx)) pass
    ``homogeneous=False`` and keep a tangent_fn that does not depend on dims."""
    vmapped = linear_vmap(op) if homogeneous else None

    def rule(p, t):
        if vmapped is not None and t[0] is not None and isinstance(p[0], torch.Tensor) and p[0].dim() == 0:
            return vmapped(p, t)
        y = call_op(op, p)
        tx = t[0]
        return y, (None if tx is None else tangent_fn(tx, *p))
    rule.__name__ = f"linear_rule_{op}"
    # dy = op(dx) holds for complex x too (the ops are real-linear): see engine.jvp_op
    rule.complex_safe = homogeneous
    return rule


def linear_vmap(op, argnum: int = 0):
    """Ops linear in one argument, the chunk carried by ``torch.vmap`` (its batching rules
    do the dim bookkeeping; used where a hand-written dim shift is not obvious)."""
    def rule(p, t):
        y = call_op(op, p)
        tx = t[argnum]
        if tx is None:
            return y, None

        def f(ti):
            q = list(p)
            q[argnum] = ti
            return call_op(op, q)
        from .engine import above_dispatch
        with above_dispatch():
            return y, torch.vmap(f)(tx)
    rule.__name__ = f"linear_vmap_rule_{op}"
    rule.complex_safe = True
    return rule


def decompose_with(reference, op=None):
    """Ops PyTorch gives no usable decomposition (fused fast paths): ``reference(*primals)``
    computes the same thing in ops that have rules, and runs on Duals, so its tangent comes
    from those rules (as the decomposition fallback does). With ``op``, the primal comes
    from the op itself and each tangent is laid out like it (code traced after the op,
    e.g. a backward's ``view``, relies on the op's own strides)."""
    def rule(p, t):
        from .dual import run_with_duals, zeros_in_layout_of
        out, tout = run_with_duals(reference, p, {}, t, {})
        if op is None:
            return out, tout
        real = call_op(op, p)

        def like(o, to):
            if to is None or not isinstance(o, torch.Tensor):
                return to
            buf = zeros_in_layout_of(o, to.shape[0])
            buf.copy_(to)
            return buf
        if isinstance(real, (tuple, list)):
            return real, type(tout)(like(o, x) for o, x in zip(real, tout))
        return real, like(real, tout)
    rule.__name__ = f"decompose_with_{reference.__name__}"
    return rule


def with_kernel(rule, try_kernel, under_inductor=False):
    """A rule with a fused kernel for the cases it covers. Where kernels are in use for
    the op's tensors (``triton_kernels.use_kernels``: CUDA, or the CPU interpreter switch),
    ``try_kernel(primals, tangents)`` returns (out, tangent_out), or None for a case the
    kernel does not cover (float64, long rows, dropout); ``rule`` runs otherwise. The
    kernels are tested against ``rule``. In a graph traced for Inductor
    (``triton_kernels.for_inductor``) only a kernel marked ``under_inductor`` is used:
    one Inductor cannot generate (flash attention), not one it would fuse better."""
    def wrapped(p, t):
        # (a CUDA tensor exists only once CUDA is initialised: on a CPU, unless asked for
        # the interpreter's kernels, the rule runs without looking at the arguments)
        if not torch.cuda.is_initialized() and not triton_kernels.kernels_on_cpu():
            return rule(p, t)
        if not under_inductor and triton_kernels.under_inductor():
            return rule(p, t)
        tensors = [x for x in pytree.tree_leaves((p, t)) if isinstance(x, torch.Tensor)]
        res = try_kernel(p, t) if triton_kernels.use_kernels(*tensors) and not for_autograd() else None
        return rule(p, t) if res is None else res
    wrapped.__name__ = f"{getattr(rule, '__name__', 'rule')}_with_kernel"
    return wrapped
