"""The tangent convention.

A tangent of a tensor of shape S has shape (K, *S): K directions travel together as a
leading chunk dimension. A zero tangent is symbolic: ``None``, never a tensor of zeros.
Integer, boolean and complex-free index outputs always have a zero tangent.

These helpers are what rules use to stay one line: they are None-aware, and they
line a tangent up against a primal of higher rank (broadcasting) by inserting the
missing dimensions *after* the chunk dimension, never before it.
"""
from __future__ import annotations

import torch

__all__ = [
    "is_differentiable",
    "chunk_of",
    "align",
    "tadd",
    "tsub",
    "tneg",
    "tscale",
    "reduce_to",
    "zeros_tangent",
    "materialize",
]


def is_differentiable(x) -> bool:
    """Only floating and complex tensors carry tangents."""
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def chunk_of(t: torch.Tensor) -> int:
    return t.shape[0]


def align(t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """View a tangent (K, *S) as (K, 1, ..., 1, *S) with ``ndim`` dims after K.

    Broadcasting a primal-shaped factor against it then broadcasts S exactly as the
    primal op broadcast the primal, while K stays in front.
    """
    if t is None:
        return None
    missing = ndim - (t.dim() - 1)
    if missing <= 0:
        return t
    return t.reshape(t.shape[:1] + (1,) * missing + t.shape[1:])


def tadd(a, b):
    """Sum of two tangents, either of which may be the symbolic zero."""
    if a is None:
        return b
    if b is None:
        return a
    nd = max(a.dim(), b.dim()) - 1
    return align(a, nd) + align(b, nd)


def tsub(a, b):
    if b is None:
        return a
    if a is None:
        return -b
    nd = max(a.dim(), b.dim()) - 1
    return align(a, nd) - align(b, nd)


def tneg(a):
    return None if a is None else -a


def tscale(t, factor, out_ndim: int | None = None):
    """t * factor, with factor primal-shaped (or a scalar) and broadcast like the primal."""
    if t is None:
        return None
    if out_ndim is None:
        out_ndim = max(t.dim() - 1, factor.dim() if isinstance(factor, torch.Tensor) else 0)
    return align(t, out_ndim) * factor


def reduce_to(t: torch.Tensor | None, shape) -> torch.Tensor | None:
    """Sum a (K, *B) tangent down to (K, *shape) where B is ``shape`` broadcast (expand's adjoint
    is not needed in forward mode, but broadcasting rules such as where() use it for masks)."""
    if t is None:
        return None
    shape = tuple(shape)
    lead = t.dim() - 1 - len(shape)
    dims = list(range(1, 1 + lead))
    for i, s in enumerate(shape):
        if s == 1 and t.shape[1 + lead + i] != 1:
            dims.append(1 + lead + i)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t.reshape((t.shape[0],) + shape)


def zeros_tangent(p: torch.Tensor, k: int) -> torch.Tensor:
    return p.new_zeros((k,) + tuple(p.shape))


def materialize(t, p: torch.Tensor, k: int) -> torch.Tensor:
    """A real tensor for a tangent that may be symbolic (used only at boundaries and by
    multi-input linear ops such as cat that must write every part)."""
    if t is None:
        return zeros_tangent(p, k)
    if t.shape[1:] != p.shape:
        t = t.expand((t.shape[0],) + tuple(p.shape))
    return t
