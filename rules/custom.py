"""User-defined differentiation: ``autograd.Function`` classes with a ``jvp`` staticmethod.

(``torch.library`` custom ops need nothing here: they reach the rule table as one op, and
a user rule registered for them with ``torch_fwd.register_frule`` is found first. One
with no rule falls back to the double-vjp identity when it has a registered backward, and
is a NoRuleError otherwise -- never a silent zero.)

An ``autograd.Function`` is not an op: PyTorch runs its ``forward`` in Python. For a
Function that defines ``jvp``, the eager path routes ``apply`` on ``Dual`` inputs to that
``jvp`` (both the ``setup_context`` and the old ``forward(ctx, ...)`` styles), one chunk
direction at a time. Dynamo inlines such a Function's forward and would silently drop
the user's ``jvp``, so the capture refuses graphs that contain one
(``refuse_user_jvp_functions``) and the eager path runs instead.
"""
from __future__ import annotations

import re

import torch
import torch.utils._pytree as pytree
from torch.autograd.function import _is_setup_context_defined

from torch_fwd.compat import function_apply
from torch_fwd.dual import Dual, innermost_level, on_dynamo_use, outside_mode, unwrap_tree

from ._cases import case, randn

_Function = torch.autograd.Function
_original_apply = function_apply()


def has_user_jvp(cls) -> bool:
    return getattr(cls, "jvp", None) is not None and cls.jvp is not _Function.jvp


class _JvpCtx:
    """The part of autograd's ctx a forward/setup_context/jvp uses."""

    def __init__(self, n_inputs):
        self._saved = ()
        self.needs_input_grad = (True,) * n_inputs
        self.materialize_grads = True
        self.dirty = False

    def save_for_backward(self, *tensors):
        self._saved = tensors

    save_for_forward = save_for_backward

    @property
    def saved_tensors(self):
        return self._saved

    def mark_dirty(self, *args):
        self.dirty = True

    def mark_non_differentiable(self, *args):
        pass

    def set_materialize_grads(self, value):
        self.materialize_grads = value




def _function_jvp(cls, flat, spec, level, mine):
    chunk = next(x._chunk for x, m in zip(flat, mine) if m and x._chunk is not None)
    primals = [x.primal if m else x for x, m in zip(flat, mine)]
    tangents = [x.tangent if m else None for x, m in zip(flat, mine)]
    p_args, p_kwargs = pytree.tree_unflatten(primals, spec)
    ctx = _JvpCtx(len(p_args))
    if _is_setup_context_defined(cls.setup_context):  # PyTorch's own test, as Function.apply uses it
        out = cls.forward(*p_args, **p_kwargs)
        cls.setup_context(ctx, tuple(p_args), out)
    else:
        out = cls.forward(ctx, *p_args, **p_kwargs)
    out, _ = unwrap_tree(out, level)
    t_args = pytree.tree_unflatten(tangents, spec)[0]
    per_k = []
    for c in range(chunk):
        tc = [None if not isinstance(p, torch.Tensor) else
              (t[c] if t is not None else torch.zeros_like(p)) for p, t in zip(p_args, t_args)]
        # forward and jvp ran with this level's mode active: what they made are this
        # level's Duals without tangents; their primals are the values
        tout, _ = unwrap_tree(cls.jvp(ctx, *tc), level)
        per_k.append(pytree.tree_leaves(tout, is_leaf=lambda x: x is None))
    flat_out, ospec = pytree.tree_flatten(out)
    wrapped = []
    for i, o in enumerate(flat_out):
        ts = [row[i] if i < len(row) else None for row in per_k]
        if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex()) and all(t is not None for t in ts):
            stacked, _ = unwrap_tree(torch.stack([t.to(o.dtype).expand(o.shape) for t in ts]), level)
            wrapped.append(Dual(o, stacked, chunk=chunk, level=level))
        else:
            wrapped.append(o)
    return pytree.tree_unflatten(wrapped, ospec)


def _function_with_history(cls, args, kwargs, flat, spec, level, mine):
    """A Function without a jvp, on Duals, whose result autograd will differentiate. Run
    by ``apply`` on the Duals, its forward would run without grad and its backward attach
    to the Dual wrappers, not to the values the eager path records: the history would end
    there. Instead the tangents come from its forward's own ops on the Duals, recorded
    (forward-mode needs no backward), and the values from ``apply`` on the primals, where
    autograd records the Function itself, its backward included. Both runs draw the same
    random numbers."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    ctx = _JvpCtx(len(args))
    with torch.random.fork_rng(devices=devices):
        if _is_setup_context_defined(cls.setup_context):
            dual_out = cls.forward(*args, **kwargs)
        else:
            dual_out = cls.forward(ctx, *args, **kwargs)
    if ctx.dirty:
        raise NotImplementedError(
            f"torch_fwd: autograd.Function {cls.__name__} modifies its inputs in place (mark_dirty); the eager "
            f"path cannot record its history in grad mode. Run under torch.no_grad(), or give it a jvp.")
    p_args, p_kwargs = pytree.tree_unflatten([x.primal if m else x for x, m in zip(flat, mine)], spec)
    with outside_mode(level):
        out = _original_apply(cls, *p_args, **p_kwargs)
    _, touts = unwrap_tree(dual_out, level)
    flat_out, ospec = pytree.tree_flatten(out)
    flat_t = pytree.tree_leaves(touts, is_leaf=lambda x: x is None)
    wrapped = [Dual(o, t, level=level) if isinstance(o, torch.Tensor) and t is not None else o
               for o, t in zip(flat_out, flat_t)]
    return pytree.tree_unflatten(wrapped, ospec)


def _apply(cls, *args, **kwargs):
    flat, spec = pytree.tree_flatten((args, kwargs))
    # the innermost level acts; Duals of enclosing levels are its constants
    level = innermost_level(flat)
    if level:
        return _on_duals(cls, args, kwargs, flat, spec, level)
    return _original_apply(cls, *args, **kwargs)


def _apply_on_duals(cls, args, kwargs, flat, spec, level):
    mine = [isinstance(x, Dual) and x._level == level for x in flat]
    if has_user_jvp(cls):
        return _function_jvp(cls, flat, spec, level, mine)
    if torch.is_grad_enabled() and any(
            m and (x.primal.requires_grad or (x.tangent is not None and x.tangent.requires_grad))
            for x, m in zip(flat, mine)):
        return _function_with_history(cls, args, kwargs, flat, spec, level, mine)
    return _original_apply(cls, *args, **kwargs)


_on_duals = _apply_on_duals


def _hide_from_dynamo():
    # a Function applied to Duals between two graphs runs as the eager path runs it;
    # dynamo tracing this code (resume functions inside fork_rng) mixed up DDP's frames
    global _on_duals
    _on_duals = torch.compiler.disable(_apply_on_duals, recursive=True)


on_dynamo_use(_hide_from_dynamo)


# Function.apply is a classmethod; wrapping it is the one hook PyTorch offers before
# forward runs. Without Dual arguments the original runs unchanged.
if _original_apply is not None:
    _Function.apply = classmethod(_apply)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


def refuse_user_jvp_functions(gm: torch.fx.GraphModule) -> str | None:
    """The name of an autograd.Function with a user jvp whose forward dynamo inlined into
    ``gm`` (found through the nodes' stack traces), or None."""
    spans = {}
    for cls in _subclasses(_Function):
        if not has_user_jvp(cls):
            continue
        code = getattr(cls.forward, "__code__", None)
        if code is None:
            continue
        last = max((ln for _, _, ln in code.co_lines() if ln is not None), default=code.co_firstlineno)
        spans.setdefault(code.co_filename, []).append((code.co_firstlineno, last, cls.__name__))
    if not spans:
        return None
    for n in gm.graph.nodes:
        for fname, line, _ in _FRAME.findall(n.meta.get("stack_trace") or ""):
            for lo, hi, name in spans.get(fname, ()):
                if lo <= int(line) <= hi:
                    return name
    return None


class _ScaledSin(torch.autograd.Function):
    """sin with a jvp written by hand (setup_context style)."""

    @staticmethod
    def forward(x, scale):
        return torch.sin(x) * scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])
        ctx.scale = inputs[1]

    @staticmethod
    def jvp(ctx, tx, _tscale):
        (x,) = ctx.saved_tensors
        return tx * torch.cos(x) * ctx.scale

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


class _OldStyleExp(torch.autograd.Function):
    """exp in the old forward(ctx, ...) style, its output reused by jvp."""

    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def jvp(ctx, tx):
        (y,) = ctx.saved_tensors
        return tx * y


TEST_CASES = [
    case("autograd_function_jvp", lambda x: _ScaledSin.apply(x, 2.0) + 1, lambda: (randn(3, 4),), graph=False,
         check_torch_func=False),
    case("autograd_function_old_style", lambda x: _OldStyleExp.apply(x * 2).sum(0), lambda: (randn(3, 4),),
         graph=False),
]
