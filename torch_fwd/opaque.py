"""Python functions as rule keys: ``register_frule(fn, rule)`` makes ``fn`` opaque.

Like ``jax.custom_jvp``: every later call of ``fn`` is one op that neither path traces
into, and the user's rule gives its tangent. We rely on ``torch.library.custom_op`` for
the op (it infers the schema from ``fn``'s type annotations and registers a fake
implementation that runs ``fn`` on fake tensors), so dynamo and make_fx keep it as one
node, and ``__torch_dispatch__`` sees it as one op.

To make *existing* references to ``fn`` reach that op, ``fn``'s code object is replaced by
a trampoline with the same free variables that calls the op through one name added to
``fn``'s module globals. ``fn.__wrapped_impl__`` keeps the original.
"""
from __future__ import annotations

import itertools
import types

import torch

_counter = itertools.count()


def make_opaque(fn) -> torch._ops.OpOverload:
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"register_frule: a Python function key must be a plain function, got {type(fn).__name__}")
    existing = getattr(fn, "__torch_fwd_op__", None)
    if existing is not None:
        return existing
    impl = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    impl.__kwdefaults__ = fn.__kwdefaults__
    impl.__annotations__ = dict(fn.__annotations__)
    impl.__doc__ = fn.__doc__
    opname = f"{fn.__name__}_{next(_counter)}"
    name = f"torch_fwd_user::{opname}"
    try:
        op = torch.library.custom_op(name, impl, mutates_args=())
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise TypeError(
            f"register_frule({fn.__qualname__}): a Python function becomes one opaque op through "
            f"torch.library.custom_op, which needs it to take and return tensors with type annotations "
            f"(e.g. def f(x: torch.Tensor, s: float) -> torch.Tensor): {e}") from e
    op.register_fake(impl)
    overload = getattr(torch.ops.torch_fwd_user, opname).default
    slot = f"__torch_fwd_opaque_{opname}__"
    fn.__globals__[slot] = op
    fn.__code__ = _trampoline(fn.__code__.co_freevars, slot, fn.__name__)
    fn.__defaults__ = None
    fn.__kwdefaults__ = None
    fn.__wrapped_impl__ = impl
    fn.__torch_fwd_op__ = overload
    return overload


def _trampoline(freevars, slot, name):
    """A code object ``name(*args, **kwargs) -> slot(*args, **kwargs)`` whose free variables
    are exactly ``freevars`` (a function's __code__ may only be swapped for one whose free
    variables match its closure)."""
    lines = [f"def _outer({', '.join(freevars)}):", f"    def {name}(*args, **kwargs):"]
    if freevars:
        lines.append("        if False:")
        lines += [f"            {v}" for v in freevars]  # referenced, so they become free variables
    lines += [f"        return {slot}(*args, **kwargs)", f"    return {name}"]
    ns: dict = {}
    exec(compile("\n".join(lines) + "\n", f"<torch_fwd opaque {name}>", "exec"), ns)
    inner = next(c for c in ns["_outer"].__code__.co_consts if isinstance(c, types.CodeType))
    if inner.co_freevars != tuple(freevars):
        inner = inner.replace(co_freevars=tuple(freevars))
    return inner
