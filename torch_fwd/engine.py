"""Applying the rule table to one op: the code both paths share.

``jvp_op(op, primals, tangents)`` follows the lookup order of docs/design.md. The eager
path calls it from ``Dual``'s dispatch with real tensors; the graph pass calls it from an
fx interpreter running under ``make_fx``, so the very same rule is traced into the JVP
graph. A rule therefore never knows which path it serves.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import traceback

import torch
import torch.utils._pytree as pytree
from torch._ops import OpOverload

from . import registry
from .registry import NoRuleError, call_op
from .tangent import align, is_differentiable

aten = torch.ops.aten

class _Hint(threading.local):
    line: str | None = None


# Where an error should point: set (per thread) by the graph pass to the fx node's stack
# trace; the eager path reads the Python stack instead.
_source_hint = _Hint()


@functools.lru_cache(maxsize=None)
def _library_paths():
    """PyTorch's and torch_fwd's folders (torch_fwd.rules sits elsewhere in an editable
    install, so it is asked where it is). Read on first use: rules import this module."""
    from torch_fwd import rules
    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, sys.modules[__package__], rules)) \
        + ("<frozen",)


def is_library_frame(filename: str) -> bool:
    """Frames of PyTorch and torch_fwd itself, skipped when naming the user's line."""
    return any(s in filename for s in _library_paths())


def user_source_line() -> str:
    if _source_hint.line:
        return _source_hint.line
    for frame in reversed(traceback.extract_stack()[:-1]):
        if is_library_frame(frame.filename):
            continue
        return f'File "{frame.filename}", line {frame.lineno}, in {frame.name}\n    {frame.line}'
    return "(unknown source line)"


class _ForAutograd(threading.local):
    on = False


_for_autograd = _ForAutograd()


def for_autograd() -> bool:
    """Whether the tangents being built will be back-propagated through (a JVP graph run
    with grad enabled on inputs that require grad). Rules then avoid what autograd cannot
    differentiate: statistics an op saves for its backward (autograd treats them as
    constants), and the fused kernels (custom ops without a backward). Otherwise they may
    reuse those, which is cheaper."""
    return _for_autograd.on


class building_for_autograd:
    """Sets for_autograd() for the duration of a with-block."""

    def __init__(self, on: bool):
        self.on = bool(on)

    def __enter__(self):
        self.prev, _for_autograd.on = _for_autograd.on, self.on

    def __exit__(self, *exc):
        _for_autograd.on = self.prev


def _autocast_keys():
    """The autocast dispatch keys, which are excluded outside any ``torch.autocast``."""
    keys = torch._C._dispatch_tls_local_exclude_set()  # (at import: outside autocast)
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autocast"):
            keys = keys | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, name))
    return keys


_AUTOCAST_KEYS = _autocast_keys()


def above_dispatch():
    """Re-enable the dispatch keys above Python (autograd, forward AD, vmap) for code run
    from inside ``__torch_dispatch__``, where PyTorch excludes them. The fallbacks (forward
    AD, double vjp) and vmap-based rules need them. Modes still on the stack (make_fx's
    proxy mode in the graph pass) keep seeing every op. Autocast stays off: the op reached
    us already cast (its key is above Python), and a rule's own matmuls re-cast would
    compute a float32 primal and tangent in bfloat16."""
    include = torch._C._dispatch_tls_local_include_set()
    return torch._C._ForceDispatchKeyGuard(include, _AUTOCAST_KEYS)


def any_active(tangents) -> bool:
    for t in tangents:
        if t is None:
            continue
        if isinstance(t, (list, tuple)):
            if any(x is not None for x in t):
                return True
        else:
            return True
    return False


def _fix_tangent(op, out, tout, k, user_rule=None, where=None):
    """The rule's tangents checked against the op's outputs (K = ``k`` directions), so that
    a faulty rule fails here, loudly, instead of producing a wrong answer downstream;
    tangents of non-differentiable outputs dropped. A library rule may give a tangent of
    lower rank, broadcast after the K directions, never into them. A user's rule
    (``user_rule``) must give (K, *output.shape) exactly (output.shape with one direction:
    its K is added): a broadcast could hide its mistake (a tangent that dropped K where K
    equals the output's size), which is a ValueError naming it."""
    if tout is None:
        return None
    what = "the output" if where is None else f"output {where}"
    if isinstance(out, torch.Tensor):
        if not is_differentiable(out):
            return None
        if not isinstance(tout, torch.Tensor):
            raise _rule_error(TypeError, op, user_rule, f"returned a {type(tout).__name__} as the tangent of {what}")
        expected = (k,) + tuple(out.shape)
        if tout.shape != expected:
            if user_rule is not None and k == 1 and tout.shape == out.shape:
                tout = tout.unsqueeze(0)
            elif user_rule is not None or tout.dim() == 0 or tout.shape[0] != k:
                raise _rule_error(ValueError, op, user_rule,
                                  f"returned a tangent of shape {tuple(tout.shape)} for {what}, of shape "
                                  f"{tuple(out.shape)}; expected {expected}: the K = {k} directions first, then "
                                  f"the output's shape")
            else:
                try:
                    tout = align(tout, out.dim()).expand(expected)
                except RuntimeError:
                    raise _rule_error(ValueError, op, None, f"returned a tangent of shape {tuple(tout.shape)} "
                                                            f"for {what}, of shape {tuple(out.shape)}") from None
        return tout if tout.dtype == out.dtype else tout.to(out.dtype)
    if isinstance(out, (tuple, list)):
        if not isinstance(tout, (tuple, list)) or len(tout) != len(out):
            raise _rule_error(TypeError, op, user_rule, f"returned tangents that do not mirror its {len(out)} outputs")
        return tuple(_fix_tangent(op, o, t, k, user_rule, i) for i, (o, t) in enumerate(zip(out, tout)))
    return None


def _rule_error(kind, op, user_rule, what):
    """A user's rule's mistake, naming the rule and the user's line; a library rule's, as
    ours (a RuntimeError asking for a report)."""
    if user_rule is None:
        return RuntimeError(f"torch_fwd internal error: the rule for {op} {what}; please report this with the "
                            f"function")
    name = getattr(user_rule, "__qualname__", None) or repr(user_rule)
    code = getattr(user_rule, "__code__", None)
    if code is not None:
        name = f"{name} ({code.co_filename}:{code.co_firstlineno})"
    return kind(f"torch_fwd: {name}, the rule for {op}, {what} (tangents are never broadcast)\n"
                f"  at {user_source_line()}")


def jvp_op(op, primals: tuple, tangents: tuple):
    """(primal_out, tangent_out) of ``op`` at ``primals`` along ``tangents`` (normalized)."""
    if not any_active(tangents):
        return call_op(op, primals), None
    rule, complex_ok = registry.resolve(op)
    # Library rules are written for real tensors (abs' derivative is not sign(z) for a
    # complex z): complex inputs take PyTorch's own formulas, never a real-only rule
    # (linear rules, dy = op(dx), are marked complex_safe and do apply; user rules always do).
    if rule is not None and (complex_ok or not _any_complex(primals)):
        out, tout = rule(primals, tangents)
        user = complex_ok and registry.is_user_rule(op)
        return out, _fix_tangent(op, out, tout, _chunk(tangents), rule if user else None)
    return _fallback(op, primals, tangents)


def _chunk(tangents) -> int:
    """K, the number of directions, of an op's (active) tangents."""
    for t in tangents:
        if isinstance(t, (list, tuple)):
            t = next((x for x in t if x is not None), None)
        if t is not None:
            return t.shape[0]
    raise AssertionError("no active tangent")


def without_rule(op, primals, tangents):
    """What jvp_op does for an op without a rule (decomposition, PyTorch's forward
    formula, double vjp): for a rule that covers only some cases of its op."""
    return _fallback(op, primals, tangents)


def _any_complex(primals) -> bool:
    for p in primals:
        if isinstance(p, torch.Tensor):
            if p.is_complex():
                return True
        elif isinstance(p, (list, tuple)):
            if any(isinstance(x, torch.Tensor) and x.is_complex() for x in p):
                return True
        elif isinstance(p, complex):
            return True
    return False


# ---------------------------------------------------------------------------------------
# Fallbacks: decomposition, PyTorch's forward-AD formula, the double-vjp identity.
# ---------------------------------------------------------------------------------------

def _decomposition(op):
    from torch._decomp import decomposition_table
    fn = decomposition_table.get(op)
    if fn is not None and _takes_schema_arguments(fn, op):
        return fn
    if isinstance(op, OpOverload) and torch._C._dispatch_has_kernel_for_dispatch_key(
            op.name(), "CompositeImplicitAutograd"):
        return op.decompose
    return None


def _takes_schema_arguments(fn, op) -> bool:
    """Whether a decomposition takes the op's arguments the way we pass them (positional
    ones by position, keyword-only ones by name). Some entries of torch._decomp's table are
    torch-level references: aten.nll_loss.default maps to a function whose 4th parameter
    is size_average, not the schema's reduction, so reduction='none' would silently
    become 'mean'. A positional argument whose name the function also has must sit at the
    same position, and a keyword-only one must be a parameter of the function."""
    try:
        sig = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    params = [p.name for p in sig if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig)
    positional = [a.name for a in op._schema.arguments if not a.kwarg_only]
    keyword = [a.name for a in op._schema.arguments if a.kwarg_only]
    return all(params.index(n) == i for i, n in enumerate(positional) if n in params) and \
        (var_kw or all(n in params for n in keyword))


# Ops whose PyTorch forward-AD formula is known to be wrong: never use it for them.
KNOWN_WRONG_FORWARD_AD = {aten.cholesky_inverse.default}


def _returns_no_tensor(op) -> bool:
    """Ops answering a question about their arguments (_has_same_storage_numel,
    is_same_size): a bool or int has no tangent. (Not numbers from tensors, .item():
    those have rules that say so.)"""
    return isinstance(op, OpOverload) and all(
        r.type.kind() in ("BoolType", "IntType") for r in op._schema.returns) and bool(op._schema.returns)


def _fallback(op, primals, tangents):
    if _returns_no_tensor(op):
        return call_op(op, primals), None
    decomp = _decomposition(op)
    if decomp is not None:
        try:
            res = _run_decomposition(op, decomp, primals, tangents)
        except NoRuleError:
            res = (NotImplemented, None)  # a part has no rule: try the op's own formula
        if res[0] is not NotImplemented:
            return res[0], _fix_tangent(op, res[0], res[1], _chunk(tangents))
    if isinstance(op, OpOverload) and op.namespace == "aten" and op not in KNOWN_WRONG_FORWARD_AD:
        res = _forward_ad(op, primals, tangents)
        if res is not None:
            return res
    res = _double_vjp(op, primals, tangents)
    if res is not None:
        return res
    raise NoRuleError(
        f"torch_fwd has no forward rule for {op}; no decomposition of it into ops with rules, "
        f"and no usable forward-AD formula or backward in PyTorch either.\n  at {user_source_line()}\n"
        f"Register one with torch_fwd.register_frule({op}, rule), where "
        f"rule(primals, tangents) returns (primal_out, tangent_out) and tangents carry the "
        f"chunk dimension first (None means zero).")


def _run_decomposition(op, decomp, primals, tangents):
    from .dual import run_with_duals
    args, kwargs = registry.split_args(op, primals)
    targs, tkwargs = registry.split_args(op, tangents)
    return run_with_duals(decomp, args, kwargs, targs, tkwargs)


def _active_slots(primals, tangents):
    slots = []
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if t is None:
            continue
        if isinstance(t, (list, tuple)):
            for j, tj in enumerate(t):
                if tj is not None:
                    slots.append((i, j))
        else:
            slots.append((i, None))
    return slots


def _substitute(primals, slots, values):
    args = [list(a) if isinstance(a, (list, tuple)) else a for a in primals]
    for (i, j), v in zip(slots, values):
        if j is None:
            args[i] = v
        else:
            args[i][j] = v
    return tuple(args)


def _get(seq, slot):
    i, j = slot
    return seq[i] if j is None else seq[i][j]


def _no_overlap(p):
    """make_dual lays the tangent out like its primal, impossible for an expanded primal
    (several elements at one address): such a primal is passed as a compact copy."""
    return p.contiguous() if torch._debug_has_internal_overlap(p) == 1 else p


class _FwADState(threading.local):
    active = False


_fwad_state = _FwADState()
# PyTorch's forward-AD level is process-wide, not per thread: one thread at a time.
_FWAD_LOCK = threading.Lock()


def _forward_ad(op, primals, tangents):
    """PyTorch's own forward formula for this single op, one chunk direction at a time
    (a fallback: correct, not fast). Returns None when PyTorch has no formula."""
    if _fwad_state.active:
        # PyTorch allows one forward-AD level at a time: this op runs inside an inner
        # level's forward-AD fallback; the double-vjp identity serves instead
        return None
    if _holds_dual(primals):
        # an enclosing level's Duals (nested jvp): PyTorch's forward AD on a tensor
        # subclass is unsupported (it crashed the process on scatter with reduce), so an
        # op without a rule or decomposition is a loud NoRuleError at second order
        return None
    with _FWAD_LOCK:
        _fwad_state.active = True
        try:
            return _forward_ad_unlocked(op, primals, tangents)
        finally:
            _fwad_state.active = False


def _forward_ad_unlocked(op, primals, tangents):
    from torch.autograd import forward_ad as fwAD
    slots = _active_slots(primals, tangents)
    k = _get(tangents, slots[0]).shape[0]
    out = None
    per_k = []
    try:
        for c in range(k):
            with above_dispatch(), fwAD.dual_level():
                duals = [fwAD.make_dual(_no_overlap(_get(primals, s)), _get(tangents, s)[c]) for s in slots]
                res = call_op(op, _substitute(primals, slots, duals))
                flat, spec = pytree.tree_flatten(res)
                unpacked = [fwAD.unpack_dual(r) if isinstance(r, torch.Tensor) else None for r in flat]
                # resolve lazy conj/neg views while the keys that do so are enabled
                per_k.append([u.tangent.resolve_conj().resolve_neg() if u is not None and u.tangent is not None
                              else None for u in unpacked])
            if out is None:
                out = pytree.tree_unflatten([u.primal if u is not None else r for u, r in zip(unpacked, flat)], spec)
    except (RuntimeError, NotImplementedError) as e:
        if "forward AD" in str(e) or "forward-mode" in str(e) or "not implemented" in str(e).lower():
            return None
        raise
    flat_out, spec = pytree.tree_flatten(out)
    touts = []
    for idx, o in enumerate(flat_out):
        if not is_differentiable(o):
            touts.append(None)
            continue
        ts = [row[idx] for row in per_k]
        if any(t is None for t in ts):
            # PyTorch marks this output non-differentiable although it is floating:
            # its "zero" would be a silent wrong answer (e.g. special.bessel_j0).
            return None
        touts.append(torch.stack(ts))
    return out, pytree.tree_unflatten(touts, spec)


def _has_backward(op) -> bool:
    if not isinstance(op, OpOverload):
        return False
    if op.namespace == "aten":
        return True
    try:
        from torch._library.custom_ops import OPDEFS
        opdef = OPDEFS.get(f"{op.namespace}::{op._opname}")
        return opdef is not None and getattr(opdef, "_backward_fn", None) is not None
    except Exception:
        return False


def _holds_dual(primals) -> bool:
    from .dual import Dual
    return any(isinstance(x, Dual) for x in pytree.tree_leaves(primals))


def _double_vjp(op, primals, tangents):
    """J v = d/du <J^T u, v>: two reverse passes, exact; for ops with only a backward."""
    if not _has_backward(op) or _holds_dual(primals):
        # (on an enclosing level's Duals, detach() would drop that level's tangents)
        return None
    # Back-propagated through: on the eager path, which records autograd history, the
    # identity is built on the primals themselves and kept differentiable, never detached.
    # A graph traced for autograd (without grad, by make_fx) would record the detaches and
    # cut the history: refused, loudly (path="auto" then runs the eager path).
    keep = for_autograd()
    if keep and not torch.is_grad_enabled():
        raise NoRuleError(
            f"torch_fwd: {op} has no forward rule; its tangent comes from its backward (the double-vjp "
            f"identity), which a JVP graph that autograd will differentiate cannot carry. The eager path "
            f"can (path='auto' or 'eager'; make_jvp_graph(..., for_autograd=False) where nothing "
            f"back-propagates), or register a rule.\n  at {user_source_line()}")
    slots = _active_slots(primals, tangents)
    with above_dispatch(), torch.enable_grad():
        leaves = [p if keep and p.requires_grad else p.detach().requires_grad_(True)
                  for p in (_get(primals, s) for s in slots)]
        out = call_op(op, _substitute(primals, slots, leaves))
        flat, spec = pytree.tree_flatten(out)
        diff = [i for i, o in enumerate(flat) if is_differentiable(o) and o.requires_grad]
        if not diff:
            return None
        us = [torch.zeros_like(flat[i], requires_grad=True) for i in diff]
        try:
            grads = torch.autograd.grad([flat[i] for i in diff], leaves, us, create_graph=True, allow_unused=True)
        except RuntimeError as e:
            if "derivative for" in str(e) and "not implemented" in str(e):
                return None
            raise
        k = _get(tangents, slots[0]).shape[0]
        touts = [[] for _ in diff]
        for c in range(k):
            dot = sum((g * _get(tangents, s)[c]).sum() for g, s in zip(grads, slots) if g is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                for lst, i in zip(touts, diff):
                    lst.append(torch.zeros_like(flat[i]))
                continue
            jv = torch.autograd.grad(dot, us, retain_graph=True, allow_unused=True, create_graph=keep)
            for lst, j, i in zip(touts, jv, diff):
                lst.append(torch.zeros_like(flat[i]) if j is None else j)
    result = [o.detach() if isinstance(o, torch.Tensor) and not keep else o for o in flat]
    tflat = [None] * len(flat)
    for lst, i in zip(touts, diff):
        tflat[i] = torch.stack(lst) if keep else torch.stack(lst).detach()
    return pytree.tree_unflatten(result, spec), pytree.tree_unflatten(tflat, spec)
