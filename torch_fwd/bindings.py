"""Running an ATen graph through PyTorch's Python bindings instead of ``OpOverload``.

A graph from make_fx calls ``torch.ops.aten.mul.Tensor(a, b)``: Python's ``OpOverload.
__call__`` and the boxed dispatcher, ~2-3 us more per op than ``torch.mul(a, b)``, which
reaches the same kernel through the generated argument parser. For the small functions
the graph path serves (a dozen ops of a few microseconds each) that is a third of a call.

``executable(gm)`` is a copy of ``gm`` whose nodes call a binding where one provably
dispatches to the node's own overload: the binding of the op's name (``torch.<name>``,
``Tensor.<name>``, ``torch._C._nn.<name>``, ...) is called once on the node's recorded
fake values under a recording dispatch mode, and is kept only if it dispatched exactly
one op, the node's overload, with the node's arguments (defaults filled from the schema)
and the very same tensor objects. The argument parser picks an overload from argument
types and shapes alone, which the graph fixes (its constants are in the code, its
tensors' metadata guarded by the caller), so the check at build time holds for every
call; and since values take no part in the choice, a verified binding is remembered per
(overload, kinds of the arguments). Any other node keeps its ``OpOverload``.

Both ``OpOverload`` and the bindings call a user's torch-function mode (or subclass)
with every op; the copy runs with ``__torch_function__`` off (``runner``). The graph's
ops are not the user's calls: dynamo captured the function under that mode, so what the
mode does is in the graph already, and Inductor's compiled code shows it nothing either.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from . import registry

__all__ = ["executable", "runner"]

# where PyTorch's generated bindings live: functions, then the namespaced ones, then methods
_NAMESPACES = (torch._C._VariableFunctions, torch._C._nn, torch._C._linalg, torch._C._special,
               torch._C._fft)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # (metadata queries such as prim.device, made while an output view is set up, run no kernel)
        if func.namespace != "prim":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _candidates(op: torch._ops.OpOverload):
    name = op._schema.name.split("::", 1)[1]
    for ns in _NAMESPACES:
        fn = getattr(ns, name, None)
        if fn is not None:
            yield fn
    # (linalg_* ops are bound in torch._C._linalg under their full name; so are special_*)
    method = getattr(torch._C.TensorBase, name, None)
    if method is not None:
        yield method


def _bound(op, args, kwargs):
    """Every argument of ``op`` in schema order, defaults filled (registry.normalize, as
    the rules see them); None if one is missing."""
    try:
        return registry.normalize(op, tuple(args), kwargs)
    except TypeError:
        return None


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _kinds(x):
    """What the argument parser chooses an overload by: a tensor's rank and dtype, a
    Python value's type, a list's structure (values never take part)."""
    if isinstance(x, torch.Tensor):
        return ("T", x.dim(), x.dtype)
    if isinstance(x, (list, tuple)):
        return (type(x), tuple(_kinds(y) for y in x))
    return type(x)


# (overload, kinds of the arguments) -> the verified binding or None: the check runs once
# per distinct call shape, not per node (an unrolled loop repeats a few thousand times)
_verified: dict = {}
_MISSING = object()


def _binding_for(node: fx.Node):
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op._schema.is_mutable:
        return None

    def val(a):
        if isinstance(a, fx.Node):
            if "val" not in a.meta:
                raise LookupError
            return a.meta["val"]
        return a

    try:
        args = torch.fx.node.map_aggregate(node.args, val)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, val)
    except LookupError:
        return None
    tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    fake_mode = next((getattr(t, "fake_mode", None) for t in tensors if getattr(t, "fake_mode", None)), None)
    if fake_mode is None:
        return None
    key = (op, _kinds(args), tuple(sorted((k, _kinds(v)) for k, v in kwargs.items())))
    fn = _verified.get(key, _MISSING)
    if fn is _MISSING:
        if len(_verified) > 4096:
            _verified.clear()
        fn = _verified[key] = _verify(op, args, kwargs, fake_mode)
    return fn


def _verify(op, args, kwargs, fake_mode):
    """The first binding that dispatches exactly ``op`` with these arguments, or None."""
    want = _bound(op, args, kwargs)
    if want is None:
        return None
    for fn in _candidates(op):
        rec = _Recorder()
        try:
            with fake_mode, rec:
                fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a binding that does not take these arguments
            continue
        if len(rec.calls) != 1:
            continue
        func, rargs, rkwargs = rec.calls[0]
        got = _bound(op, rargs, rkwargs) if func is op else None
        if got is not None and _same(got, want):
            return fn
    return None


def executable(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` calling Python bindings where they provably run the same overload
    (module docstring). Run it through ``runner``."""
    from .capture import TRACE_LOCK
    graph = fx.Graph()
    env: dict = {}
    with TRACE_LOCK:
        for n in gm.graph.nodes:
            new = graph.node_copy(n, lambda m: env[m])
            if n.op == "call_function":
                fn = _binding_for(n)
                if fn is not None:
                    new.target = fn
            env[n] = new
    return fx.GraphModule(gm, graph)


def runner(gm: fx.GraphModule):
    """``gm``'s function, run through its executable copy with ``__torch_function__`` off
    (what ``OpOverload`` calls see: a torch-function mode the graph was captured under is
    already in the graph, and must not run twice)."""
    forward = executable(gm).forward
    disabled = torch._C.DisableTorchFunction

    def run(*args):
        with disabled():
            return forward(*args)
    return run
