"""The one frule table, and the lookup order both paths use.

A rule is ``rule(primals, tangents) -> (primal_out, tangent_out)``: ``primals`` are the
op's arguments in schema order (keyword-only ones included, defaults filled in, so a rule
can unpack them by position), ``tangents`` the matching tangents (``None`` for a zero
tangent or a non-differentiable argument; a list for a ``Tensor[]`` argument), each with
the chunk dimension first. ``tangent_out`` mirrors ``primal_out``; ``None`` is zero.

Lookup order (docs/design.md): user rule, library rule, decomposition, PyTorch's
forward-AD formula batched over the chunk, the double-vjp identity, then NoRuleError.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch._ops import OpOverload, OpOverloadPacket

__all__ = ["NoRuleError", "register_frule", "frule", "lookup", "normalize", "call_op", "library_rule"]

Rule = Callable[[tuple, tuple], tuple[Any, Any]]

_lock = threading.RLock()
_LIBRARY: dict[OpOverload, Rule] = {}
_USER: dict[Any, Rule] = {}
# Bumped on every registration, so that cached JVP graphs built under an older table
# are never reused (a stale rule would be a silent wrong answer).
_generation = [0]


class NoRuleError(NotImplementedError):
    """No forward rule, decomposition or forward-AD formula exists for an op."""


def generation() -> int:
    return _generation[0]


def _check_key(op):
    if isinstance(op, (OpOverload, OpOverloadPacket)):
        return op
    import types
    if isinstance(op, types.FunctionType):
        from .opaque import make_opaque
        return make_opaque(op)
    raise TypeError(f"register_frule: op must be an OpOverload or OpOverloadPacket (an ATen op, or a "
                    f"torch.library custom op such as torch.ops.mylib.myop) or a Python function, "
                    f"got {type(op).__name__}")


def register_frule(op, rule: Rule) -> Rule:
    """Register a user rule for ``op`` (an ATen/custom OpOverload or packet, or a Python
    function, which then stays one opaque call in captured graphs, like jax.custom_jvp).

    User rules take precedence over library rules, in the eager and the graph path.
    """
    if not callable(rule):
        raise TypeError(f"register_frule: rule must be callable, got {type(rule).__name__}")
    op = _check_key(op)
    with _lock:
        _USER[op] = rule
        _generation[0] += 1
    return rule


def frule(op):
    """Decorator form of :func:`register_frule`."""
    def deco(rule):
        register_frule(op, rule)
        return rule
    return deco


def library_rule(op: OpOverload, rule: Rule) -> Rule:
    """Register a library rule (used by ``rules/``); keyed by OpOverload only, so that a
    rule can never reach an overload it was not written for."""
    if not isinstance(op, OpOverload):
        raise TypeError(f"library rules are keyed by OpOverload, got {op!r}")
    with _lock:
        _LIBRARY[op] = rule
        _generation[0] += 1
    return rule


def unregister_frule(op) -> None:
    op = getattr(op, "__torch_fwd_op__", op)
    with _lock:
        _USER.pop(op, None)
        _generation[0] += 1


def is_functional(op: OpOverload) -> bool:
    return not op._schema.is_mutable


def lookup(op) -> Rule | None:
    """User rule (overload, then packet for functional overloads), then library rule."""
    rule = _USER.get(op)
    if rule is not None:
        return rule
    if isinstance(op, OpOverload):
        # A packet rule never applies to an out= or in-place overload: those reach the
        # functional rule through functionalization / the eager path's mutation handling.
        if is_functional(op):
            rule = _USER.get(op.overloadpacket)
            if rule is not None:
                return rule
        return _LIBRARY.get(op)
    return None


def is_user_rule(op) -> bool:
    hit = _resolved.get(id(op))
    if hit is not None and hit[1] == _generation[0]:
        return hit[4]
    return _is_user_rule(op)


def _is_user_rule(op) -> bool:
    return op in _USER or (isinstance(op, OpOverload) and is_functional(op) and op.overloadpacket in _USER)


def per_op(fn):
    """``fn(op)`` remembered per op, keyed by id(op): an OpOverload's __hash__ is Python
    code, and the eager path asks such questions on every op. Each entry holds the op
    itself, so its id cannot be reused while the entry lives. For facts of an op's schema
    only (not of the rule table: see resolve)."""
    cache: dict[int, tuple] = {}

    def get(op):
        hit = cache.get(id(op))
        if hit is None:
            hit = cache[id(op)] = (op, fn(op))
        return hit[1]
    get.__name__ = get.__qualname__ = fn.__name__
    get.__doc__ = fn.__doc__
    return get


_resolved: dict[int, tuple] = {}  # id(op) -> (op, generation, rule, complex_ok, a user's rule)


def resolve(op) -> tuple[Rule | None, bool]:
    """(lookup(op), whether that rule also applies to complex inputs: user rules and
    rules marked ``complex_safe``), remembered per op until the table changes (the
    generation is part of the entry, so a registration racing a reader is never lost)."""
    hit = _resolved.get(id(op))
    gen = _generation[0]
    if hit is not None and hit[1] == gen:
        return hit[2], hit[3]
    rule = lookup(op)
    user = rule is not None and _is_user_rule(op)
    complex_ok = rule is not None and (getattr(rule, "complex_safe", False) or user)
    _resolved[id(op)] = (op, gen, rule, complex_ok, user)
    return rule, complex_ok


@per_op
def _schema(op: OpOverload):
    return tuple((a.name, a.kwarg_only, a.has_default_value(), a.default_value if a.has_default_value() else None)
                 for a in op._schema.arguments)


def normalize(op: OpOverload, args: tuple, kwargs: dict | None) -> tuple:
    """All of an op's arguments, positional, in schema order, defaults filled in."""
    schema = _schema(op)
    if not kwargs and len(args) == len(schema):
        return tuple(args)
    out = list(args)
    for name, _kwonly, has_default, default in schema[len(args):]:
        if kwargs and name in kwargs:
            out.append(kwargs[name])
        elif has_default:
            out.append(default)
        else:
            raise TypeError(f"{op}: missing argument {name!r}")
    return tuple(out)


def split_args(op: OpOverload, full_args) -> tuple[tuple, dict]:
    """The inverse of :func:`normalize`: positional arguments and keyword-only ones."""
    pos, kw = [], {}
    for (name, kwonly, _h, _d), a in zip(_schema(op), full_args):
        if kwonly:
            kw[name] = a
        else:
            pos.append(a)
    return tuple(pos), kw


def call_op(op: OpOverload, full_args) -> Any:
    """Call ``op`` with arguments in the layout :func:`normalize` returns."""
    if not _has_kwarg_only(op):
        return op(*full_args)
    pos, kw = split_args(op, full_args)
    return op(*pos, **kw)


@per_op
def _has_kwarg_only(op) -> bool:
    return any(kwonly for _n, kwonly, _h, _d in _schema(op))
