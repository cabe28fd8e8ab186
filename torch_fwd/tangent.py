"""The tangent convention.

A tangent of a tensor of shape S has shape (K, *S): K directions travel together as a
leading chunk dimension. A zero tangent is symbolic: ``None``, never a tensor of zeros.
Integer and boolean outputs (indices, masks, counts) always have a zero tangent.

These helpers are what rules use to stay one line: they are None-aware, and they
line a tangent up against a primal of higher rank (broadcasting) by inserting the
missing dimensions *after* the chunk dimension, never before it.
"""
from __future__ import annotations

import torch

__all__ = ["is_differentiable", "align", "tadd", "zeros_tangent", "materialize", "shares_storage",
           "restride_through_storage"]


def is_differentiable(x) -> bool:
    """Only floating and complex tensors carry tangents."""
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


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


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    # a Dual (an enclosing level's, in a nested jvp) holds its values in its primal
    while hasattr(a, "primal") and hasattr(b, "primal"):
        a, b = a.primal, b.primal
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def restride_through_storage(tx: torch.Tensor, x: torch.Tensor, size, stride, offset) -> torch.Tensor:
    """The tangent of ``x.as_strided(size, stride, offset)`` given ``tx``, x's tangent: lay
    ``tx`` out in a buffer shaped like x's storage (one per direction, zeros outside x),
    then stride it as the primal is strided."""
    k = tx.shape[0]
    n = x.untyped_storage().nbytes() // x.element_size()
    buf = tx.new_zeros((k, n))
    buf.as_strided((k,) + tuple(x.shape), (n,) + tuple(x.stride()), x.storage_offset()).copy_(tx)
    return buf.as_strided((k,) + tuple(size), (n,) + tuple(stride), offset)
