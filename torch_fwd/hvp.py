"""hvp: Hessian-vector products by forward-over-reverse.

The gradient of ``func`` is traced to ATen with make_fx, autograd's backward included
(make_fx records the backward ops ``torch.autograd.grad`` runs), and the forward-mode pass
builds the JVP of that graph: one pass gives the gradient and H v for K directions at once.
The backward ops get rules like any op (PyTorch itself has no forward formula for some,
e.g. ``log_sigmoid_backward`` and ``softplus_backward``: their decompositions serve).

Autograd detaches the tensors it saves for backward (``aten.detach`` in the trace); for
forward-over-reverse those are the same values and carry the tangent, so the trace's
detaches become aliases. A ``.detach()`` the user writes would be a stop-gradient that
rewrite erases, so a ``func`` that calls it is refused, loudly.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from .api import _check
from .capture import to_aten
from .engine import building_for_autograd
from .transform import build_jvp_graph

__all__ = ["hvp"]

aten = torch.ops.aten

_DETACHES = {torch.Tensor.detach, torch.Tensor.detach_, torch.detach, torch.Tensor.requires_grad_}


class _RefuseUserDetach(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.detach, torch.Tensor.detach_, torch.detach):
            raise NotImplementedError(
                "torch_fwd.hvp: func calls .detach(). In the traced gradient torch_fwd cannot tell a "
                "stop-gradient you wrote from the detaches autograd makes of saved tensors; compute this "
                "Hessian-vector product as jvp of your own gradient function instead")
        return func(*args, **(kwargs or {}))


def _detach_to_alias(gm: fx.GraphModule) -> fx.GraphModule:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.detach.default:
            n.target = aten.alias.default
    gm.recompile()
    return gm


def hvp(func, primals, tangents, *, chunked=False):
    """``(gradient, H @ tangents)`` of a scalar ``func`` at ``primals``, both mirroring
    ``primals``; with ``chunked=True`` every tangent leaf has a leading dimension K and so
    does every Hessian-vector product (K directions in one pass). Forward-over-reverse:
    torch_fwd's JVP of autograd's gradient, traced once per call. ``func`` must be
    capturable by make_fx (no data-dependent control flow) and return a scalar tensor.
    """
    if not callable(func):
        raise TypeError(f"hvp: func must be callable, got {type(func).__name__}")
    flat_p, flat_t, spec, k = _check(primals, tangents, chunked, name="hvp")
    n = len(flat_p)

    def grad_fn(*flat):
        with torch.enable_grad():
            out = func(*pytree.tree_unflatten(list(flat), spec))
            if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.is_floating_point():
                raise TypeError(f"hvp: func must return a floating scalar tensor, got "
                                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            grads = torch.autograd.grad(out, flat, create_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, flat))

    def traced(*flat):
        with _RefuseUserDetach():
            return grad_fn(*flat)

    # example inputs that require grad, so that autograd records (and make_fx traces) the
    # backward; the graph then runs on the caller's tensors, which need not
    examples = [p.detach().requires_grad_(True) for p in flat_p]
    try:
        aten_gm = to_aten(traced, examples, functionalize=False)
    except (NotImplementedError, TypeError):
        raise
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"hvp: the gradient of func could not be traced ({type(e).__name__}: {e}); hvp needs "
                           f"a function make_fx can capture (no data-dependent control flow)") from e
    aten_gm = _detach_to_alias(aten_gm)
    grad_needed = torch.is_grad_enabled() and any(x.requires_grad for x in flat_p + flat_t)
    with building_for_autograd(grad_needed):
        graph = build_jvp_graph(aten_gm, flat_p, [True] * n, k)
    ts = [(t if chunked else t.unsqueeze(0)).contiguous() for t in flat_t]
    grads, hvps, _ = graph(flat_p, ts)
    hvps = [h if h is not None else torch.zeros((k,) + tuple(g.shape), dtype=g.dtype, device=g.device)
            for h, g in zip(hvps, grads)]
    if not chunked:
        hvps = [h.squeeze(0) for h in hvps]
    return pytree.tree_unflatten(list(grads), spec), pytree.tree_unflatten(hvps, spec)
