"""The eager path: ``Dual``, a wrapper tensor subclass carrying (primal, chunked tangent).

Every op on a Dual goes through ``__torch_dispatch__`` to the shared rule table
(``engine.jvp_op``). Inside ``torch_fwd.jvp``'s eager path a ``DualMode`` is also active:
it wraps every floating tensor the function creates (a buffer from ``torch.zeros``, say)
so that an in-place write of a value with a tangent into it is tracked, not dropped.

Views keep a link to the Dual they view, and derive their tangent from the base's
tangent lazily, as a real view of it: a tangent materialised in the base by a write
through one view is seen by every other view, as with primal storage.

``Dual`` is traceable (``__tensor_flatten__``/``__tensor_unflatten__``), the protocol
torch.compile and aot_autograd use for wrapper subclasses.

Nesting (a ``jvp`` inside a function being differentiated) gives each ``DualMode`` a
level, its perturbation tag: a mode only unwraps Duals of its own level and treats a Dual
of a lower level as an ordinary tensor. The rule it applies then runs on those lower-level
Duals with the mode itself popped (``__torch_dispatch__`` runs below its own mode), so the
enclosing level differentiates the rule: a Dual of the outer level is a constant to the
inner one, and the two perturbations never mix.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from . import registry
from .engine import above_dispatch, building_for_autograd, for_autograd, jvp_op, user_source_line
from .tangent import is_differentiable, shares_storage

aten = torch.ops.aten

__all__ = ["Dual", "DualMode", "run_with_duals", "current_level", "innermost_level"]


class _Levels(threading.local):
    top = 0      # the innermost level entered by run_with_duals / the graph pass
    handling = 0  # the level whose mode is applying a rule right now (0: none)
    break_untracked_writes = False  # see breaking_untracked_writes


_levels = _Levels()


def current_level() -> int:
    """How many levels of differentiation the calling thread is inside (0: none)."""
    return _levels.top


class UntrackedWrite(RuntimeError):
    """A value with a tangent written into a tensor no level tracks (refused, nothing
    written). Its own class: jvp's region-by-region run tells it from other errors."""


@contextlib.contextmanager
def breaking_untracked_writes():
    """While Duals run under dynamo (no DualMode: tensors the function creates inside a
    region are plain), a write with a tangent into a plain fake tensor ends the region
    there instead of failing it (see _write)."""
    prev = _levels.break_untracked_writes
    _levels.break_untracked_writes = True
    try:
        yield
    finally:
        _levels.break_untracked_writes = prev


class entered_level:
    """A new innermost level for the duration of a with-block."""

    def __enter__(self):
        self.prev = _levels.top, _levels.handling
        _levels.top += 1
        return _levels.top

    def __exit__(self, *exc):
        _levels.top, _levels.handling = self.prev


class Dual(torch.Tensor):
    """A tensor with a forward-mode tangent of shape (K, *self.shape), or None (zero)."""

    @staticmethod
    def __new__(cls, primal: torch.Tensor, tangent: torch.Tensor | None = None, *, chunk: int | None = None,
                _view_of=None, level: int | None = None):
        if level is None:
            # a rule wrapping its own result gets the level being handled; a user's Dual
            # the innermost level entered (1 outside any jvp)
            level = _levels.handling or max(_levels.top, 1)
        if isinstance(primal, Dual) and primal._level >= level:
            raise TypeError(f"Dual: primal is a Dual of level {primal._level}; a Dual can only wrap "
                            f"Duals of lower levels (level {level} here)")
        if not isinstance(primal, torch.Tensor):
            raise TypeError(f"Dual: primal must be a Tensor, got {type(primal).__name__}")
        return Dual._checked_by_caller(primal, tangent, chunk, level, _view_of)

    @staticmethod
    def _checked_by_caller(primal, tangent, chunk, level, view_of=None):
        """A Dual made by torch_fwd itself from a rule's checked output (the hot path of
        every op): the constructor's argument checks skipped, nothing else."""
        r = torch.Tensor._make_wrapper_subclass(
            Dual, primal.size(), strides=primal.stride(), storage_offset=primal.storage_offset(),
            dtype=primal.dtype, layout=primal.layout, device=primal.device, requires_grad=False)
        r.primal = primal
        r._tangent = tangent
        r._view_of = view_of
        r._chunk = chunk if chunk is not None else (tangent.shape[0] if tangent is not None else None)
        r._level = level
        return r

    def __init__(self, primal, tangent=None, *, chunk=None, _view_of=None, level=None):
        if tangent is not None:
            if not isinstance(tangent, torch.Tensor):
                raise TypeError(f"Dual: tangent must be a Tensor or None, got {type(tangent).__name__}")
            if tangent.shape[1:] != primal.shape:
                raise ValueError(f"Dual: tangent shape {tuple(tangent.shape)} is not (K, *{tuple(primal.shape)})")

    @property
    def tangent(self) -> torch.Tensor | None:
        t = self._tangent
        if t is None and self._view_of is not None:
            base, derive = self._view_of
            bt = base.tangent
            if bt is not None:
                t = self._tangent = derive(bt)
        return t

    def ensure_tangent(self, chunk: int) -> torch.Tensor:
        """Materialise a zero tangent in place (for an in-place write), sharing storage with
        the base's tangent when this Dual is a view."""
        t = self.tangent
        if t is not None:
            return t
        if self._view_of is not None:
            base, derive = self._view_of
            t = derive(base.ensure_tangent(chunk))
        else:
            t = zeros_in_layout_of(self.primal, chunk)
        self._tangent = t
        self._chunk = chunk
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    # Ways out of the tensor world. A Dual is a wrapper without memory of its own: each of
    # these reads its primal's, with dispatch off (under a DualMode, NumPy's conversion
    # would otherwise run its detach through the mode and read a wrapper). Values copied
    # out (tolist, item) carry no tangent, for control flow. Memory shared out (numpy,
    # __array__, __dlpack__) is refused while the tensor carries a tangent, as PyTorch
    # refuses numpy() of a tensor that requires grad: an array computed from it would
    # silently drop the tangent, a write through it would change the value and not the
    # tangent. ``.detach()`` first says the tangent is meant to go. (untyped_storage() stays
    # the wrapper's own, which holds no data and raises if read: fake tensors and dynamo
    # describe a Dual by it.)
    def tolist(self):
        with no_dispatch():
            return _memory(self, None).tolist()

    def numpy(self, *, force=False):
        if force:  # a copy, as PyTorch's force=True makes
            with no_dispatch():
                return _memory(self, None).detach().cpu().resolve_conj().resolve_neg().numpy().copy()
        with no_dispatch():
            return _memory(self, "numpy()").numpy()

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __dlpack__(self, *args, **kwargs):
        with no_dispatch():
            return _memory(self, "__dlpack__()").__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return _memory(self, None).__dlpack_device__()

    def __deepcopy__(self, memo):
        # a copy of the value and of its tangent at every level, as clone() makes
        if id(self) not in memo:
            memo[id(self)] = _copied(self)
        return memo[id(self)]

    def data_ptr(self):
        # (an address, compared for identity or alignment; PyTorch gives it for tensors
        # that require grad too)
        return _memory(self, None).data_ptr()

    def __repr__(self):
        return f"Dual(primal={self.primal!r}, tangent={self.tangent!r}, level={self._level})"

    def __tensor_flatten__(self):
        t = self.tangent
        return (["primal", "_tangent"] if t is not None else ["primal"]), None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return Dual(inner["primal"], inner.get("_tangent"))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if len(types) > 1 and _outer_subclass(types, args, kwargs):
            return NotImplemented
        # no mode: Duals used directly; the innermost level among the arguments acts
        return dispatch(func, args, kwargs, None, innermost_level((*args, *kwargs.values()) if kwargs else args))


def _copied(x):
    if not isinstance(x, Dual):
        with no_dispatch():
            return x.clone()
    t = x.tangent
    return Dual(_copied(x.primal), _copied(t) if t is not None else None, chunk=x._chunk, level=x._level)


def _memory(x, what):
    """The plain tensor holding a Dual's values (through the Duals of every level it
    wraps). ``what``: the way out that shares memory, refused while a level carries a
    tangent (None: a copy or an address, never refused)."""
    while isinstance(x, Dual):
        if what is not None and x.tangent is not None:
            raise RuntimeError(
                f"torch_fwd: {what} of a tensor that carries a tangent would share its memory outside "
                f"torch: what is computed from it, or written into it, would silently miss the tangent. "
                f"Call .detach() first (as for a tensor that requires grad) to read its values "
                f"as constants.\n  at {user_source_line()}")
        x = x.primal
    return x


def innermost_level(values) -> int:
    """The highest level of a Dual among ``values`` (0: none), each a Dual, a list or tuple
    (a Tensor[] argument of an op: ATen arguments nest no deeper) or anything else."""
    level = 0
    for a in values:
        if isinstance(a, Dual):
            level = max(level, a._level)
        elif isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, Dual):
                    level = max(level, x._level)
    return level


def zeros_in_layout_of(p: torch.Tensor, chunk: int) -> torch.Tensor:
    """Zeros (K, *p.shape) whose every slice has p's dimension order, so that any view the
    primal allows is also a view of the tangent (in-place writes through views rely on it)."""
    order = sorted(range(p.dim()), key=lambda d: -p.stride(d))
    buf = p.new_zeros((chunk,) + tuple(p.shape[d] for d in order))
    return buf.permute([0] + [1 + order.index(d) for d in range(p.dim())])


class DualMode(TorchDispatchMode):
    """Routes every op through the rule table and wraps every floating tensor result as
    a Dual, so tensors created inside the function can receive tangents in place."""

    def __init__(self, chunk: int, level: int):
        super().__init__()
        self.chunk = chunk
        self.level = level

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if types and _outer_subclass(types, args, kwargs):
            return NotImplemented
        return dispatch(func, args, kwargs, self, self.level)


_DTENSOR_MODULE = "torch.distributed.tensor._api"


def _dtensor_class():
    """DTensor's class, or None where it was never imported (then no DTensor exists)."""
    mod = sys.modules.get(_DTENSOR_MODULE)
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor (without importing torch.distributed)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(x, cls)


def _outer_subclass(types, args=(), kwargs=None) -> bool:
    """Whether an op's arguments include a DTensor: DTensor's own dispatch runs it first
    (returning NotImplemented hands it the op), and runs the op again on its local
    tensors, which are Duals where they carry tangents. So Duals sit inside DTensors,
    never around them: DTensor's sharding rules see DTensors, ours see Duals.

    The rules then run below DTensor's autograd, which records the DTensor op and not
    what the rule does: gradients would miss the JVP. So in grad mode, a DTensor that
    requires grad is refused here, loudly."""
    cls = _dtensor_class()
    if cls is None or not any(issubclass(t, cls) for t in types):
        return False
    if torch.is_grad_enabled():
        for a in pytree.tree_leaves((args, kwargs)):
            if isinstance(a, cls) and a.requires_grad:
                raise NotImplementedError(
                    "torch_fwd: autograd through DTensors (tensor parallel) is not supported on the eager path: "
                    "the JVP runs on their local tensors, below DTensor's autograd, so gradients would miss it. "
                    "Compute the JVP under torch.no_grad() (its values are exact), or train with FSDP2 or DDP, "
                    f"which torch_fwd trains through.\n  at {user_source_line()}")
    return True


def _shift(placements):
    """A tangent's placements: its primal's, with sharded dims one further (K in front)."""
    from torch.distributed.tensor import Shard
    shifted = []
    for pl in placements:
        if isinstance(pl, Shard):
            sf = getattr(pl, "split_factor", None)
            pl = type(pl)(pl.dim + 1, split_factor=sf) if sf is not None else type(pl)(pl.dim + 1)
        shifted.append(pl)
    return tuple(shifted)


def _dtensor_of_dual(p, t, chunk, level):
    """A DTensor argument with its tangent (a DTensor of shape (K, *p.shape), or a full
    plain tensor): a DTensor whose local tensor is a Dual of the local primal and tangent."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    mesh, placements = p.device_mesh, p.placements
    if t is not None:
        if isinstance(t, DTensor):
            if t.device_mesh != mesh or tuple(t.placements) != _shift(placements):
                raise ValueError(
                    f"jvp: a tangent DTensor has placements {tuple(t.placements)} (K first) on {t.device_mesh}, "
                    f"but its primal has {tuple(placements)} on {mesh}: give the tangent its primal's mesh "
                    f"and placements, or pass a full tensor")
            t = t.to_local()
        else:  # a full tangent: this rank's shard of it, cut here (no collective)
            t = distribute_tensor(t, mesh, _shift(placements), src_data_rank=None).to_local()
    local = Dual(p.to_local(), t, chunk=chunk, level=level)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())


def _split_dtensor(x, level):
    """(primal, tangent) DTensors of a DTensor output whose local tensor is a Dual."""
    from torch.distributed.tensor import DTensor
    local = x.to_local()
    if not _mine(local, level):
        return x, None
    mesh, placements = x.device_mesh, x.placements
    primal = DTensor.from_local(local.primal, mesh, placements, run_check=False, shape=x.shape, stride=x.stride())
    t = local.tangent
    if t is None:
        return primal, None
    shape = (t.shape[0],) + tuple(x.shape)
    stride = torch.empty(shape, device="meta").stride()
    return primal, DTensor.from_local(t, mesh, _shift(placements), run_check=False, shape=shape, stride=stride)


@contextlib.contextmanager
def outside_mode(level):
    """Code run as if this level's DualMode were not active (it is popped while the block
    runs, when it is the innermost mode): plain tensors stay plain. (PyTorch's
    _pop_mode_temporarily; without it, nothing is popped.)"""
    from torch.utils import _python_dispatch as pd
    top = pd._get_current_dispatch_mode() if hasattr(pd, "_get_current_dispatch_mode") else None
    if isinstance(top, DualMode) and top.level == level and hasattr(pd, "_pop_mode_temporarily"):
        with pd._pop_mode_temporarily():
            yield
    else:
        yield


@contextlib.contextmanager
def outside_modes():
    """Code run as if no DualMode were active: the DualModes at the top of the mode stack
    (every level's) are popped while the block runs, so plain tensors it makes stay plain.
    (PyTorch's _pop_mode_temporarily; without it, nothing is popped.)"""
    from torch.utils import _python_dispatch as pd
    if not (hasattr(pd, "_get_current_dispatch_mode") and hasattr(pd, "_pop_mode_temporarily")):
        yield
        return
    with contextlib.ExitStack() as stack:
        while isinstance(pd._get_current_dispatch_mode(), DualMode):
            stack.enter_context(pd._pop_mode_temporarily())
        yield


def _mine(x, level):
    return isinstance(x, Dual) and x._level == level


def _p(a, level):
    if _mine(a, level):
        return a.primal
    if isinstance(a, (list, tuple)) and a and any(_mine(x, level) for x in a):
        return type(a)(x.primal if _mine(x, level) else x for x in a)
    return a


def _t(a, level):
    if _mine(a, level):
        return a.tangent
    if isinstance(a, (list, tuple)) and a and any(_mine(x, level) for x in a):
        ts = [x.tangent if _mine(x, level) else None for x in a]
        return ts if any(t is not None for t in ts) else None
    return None


def _chunk_of(full, mode, level):
    if mode is not None:
        return mode.chunk
    for a in full:
        for x in (a if isinstance(a, (list, tuple)) else (a,)):
            if _mine(x, level) and x._chunk is not None:
                return x._chunk
    return None


# Ops that alias their input but must not carry its tangent.
_TANGENT_DROPPING_VIEWS = {aten.detach.default}


def is_view(func) -> bool:
    """Whether an op returns a view of its first argument (alias annotation, no write)."""
    rets = func._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


@registry.per_op
def _op_facts(func):
    """(an in-place view op, a mutating op, a view op whose result carries its base's
    tangent, an op returning an alias of its first argument)"""
    return (torch.Tag.inplace_view in func.tags, func._schema.is_mutable,
            is_view(func) and func not in _TANGENT_DROPPING_VIEWS, is_view(func))


def _split(full, level):
    """(primals, tangents) of normalized arguments, this level's Duals unwrapped."""
    primals, tangents = [], []
    for a in full:
        if isinstance(a, Dual) and a._level == level:
            primals.append(a.primal)
            tangents.append(a.tangent)
        elif isinstance(a, (list, tuple)):
            primals.append(_p(a, level))
            tangents.append(_t(a, level))
        else:
            primals.append(a)
            tangents.append(None)
    return tuple(primals), tuple(tangents)


def dispatch(func, args, kwargs, mode, level):
    prev = _levels.handling
    _levels.handling = level
    try:
        return _dispatch(func, args, kwargs, mode, level)
    finally:
        _levels.handling = prev


# Where Python enters our code from a tensor operation (a dispatch) or from a way out of
# the tensor world: hidden from dynamo once it is in use (hide_dispatch_from_dynamo).
_PYTHON_ENTRY_POINTS = ((DualMode, "__torch_dispatch__"), (Dual, "__torch_dispatch__"), (Dual, "tolist"),
                        (Dual, "numpy"), (Dual, "__array__"), (Dual, "__dlpack__"), (Dual, "__dlpack_device__"),
                        (Dual, "__deepcopy__"), (Dual, "data_ptr"), (Dual, "__repr__"))
_hidden = [False]
_on_dynamo_use: list = []


def hide_dispatch_from_dynamo():
    """Once dynamo is in use (capture.ensure_compiler_imported, the backend): our Python
    entry points under ``torch.compiler.disable``. Under torch.compile dynamo considers
    every Python frame run between its graphs, ours too: where a function on Duals runs
    eagerly (after a graph break, inside DistributedDataParallel's forward), it compiled,
    and recompiled, the rules' own frames as regions of the user's function. (Not at
    import: importing dynamo takes a second; the wrapper costs ~0.3 us an op.)"""
    if _hidden[0]:
        return
    _hidden[0] = True
    for cls, name in _PYTHON_ENTRY_POINTS:
        f = cls.__dict__[name]
        if isinstance(f, classmethod):
            setattr(cls, name, classmethod(torch.compiler.disable(f.__func__, recursive=True)))
        else:
            setattr(cls, name, torch.compiler.disable(f, recursive=True))
    for hide in _on_dynamo_use:
        hide()


def on_dynamo_use(hide):
    """Register ``hide()``, called once dynamo is in use (hide_dispatch_from_dynamo): for
    other Python code of ours that runs on Duals between graphs (rules/custom.py, api)."""
    if _hidden[0]:
        hide()
    else:
        _on_dynamo_use.append(hide)


def _dispatch(func, args, kwargs, mode, level):
    full = registry.normalize(func, args, kwargs)
    primals, tangents = _split(full, level)
    facts = _op_facts(func)
    inplace_view, mutable, view, alias = facts
    if alias and not _mine(full[0], level):
        # An alias (a view, detach) of a tensor this level does not track is that tensor's
        # memory, plain: a wrapper would hide the memory from whatever reads it (numpy()),
        # a tangent written into it is refused as one written into the tensor itself, and
        # autograd above this dispatch records it as it would without torch_fwd.
        return jvp_op(func, primals, tangents)[0]
    if _grad_enabled() and innermost_level(primals) == 0:
        # Autograd records what the rule does on the primals and tangents (plain tensors:
        # PyTorch runs __torch_dispatch__ below autograd, which is re-entered for it), so
        # outputs and tangents back-propagate. Views and in-place ops are recorded even on
        # tensors that do not require grad yet: a value that does may be written into them
        # later, and autograd must know the view to carry it to the base. (On an enclosing
        # level's Duals, that level's dispatch records when the rule reaches their primals.)
        grad = _requires_grad(primals, tangents)
        if grad or alias or mutable:
            with above_dispatch(), building_for_autograd(grad or for_autograd()):
                return _apply_rule(func, args, kwargs, full, primals, tangents, mode, level, facts)
    return _apply_rule(func, args, kwargs, full, primals, tangents, mode, level, facts)


_grad_enabled = torch._C.is_grad_enabled


def _apply_rule(func, args, kwargs, full, primals, tangents, mode, level, facts):
    inplace_view, mutable, view, _ = facts
    if inplace_view:
        return _inplace_view(func, args, kwargs, full, primals, level)
    if mutable and registry.resolve(func)[0] is None:
        # (an op with its own rule, e.g. batch norm updating running statistics, mutates
        # inside the rule by calling the op itself)
        return _mutating(func, full, primals, tangents, mode, level)
    out, tout = jvp_op(func, primals, tangents)
    return _wrap(func, out, tout, mode, full[0] if view else None, primals, level)


def _on_wrapper_metadata(func, args, kwargs):
    """Run a metadata-changing op (squeeze_, resize_) on a Dual wrapper itself: dispatch
    off and meta kernels on, as PyTorch's return_and_correct_aliasing does, so only the
    wrapper's sizes and strides change."""
    with torch.utils._mode_utils.no_dispatch():
        meta = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            func(*args, **kwargs)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta)


def _inplace_view(func, args, kwargs, full, primals, level):
    """squeeze_, transpose_, as_strided_, ...: the primal changes shape in place, the
    tangent becomes the out-of-place view's tangent (a real view of the old one), and the
    wrapper's own metadata follows (_on_wrapper_metadata)."""
    self_ = full[0]
    if not _mine(self_, level):
        return registry.call_op(func, primals)
    fop = functional_overload(func)
    if fop is None:
        raise NotImplementedError(f"torch_fwd: {func} has no out-of-place twin to take its rule from\n"
                                  f"  at {user_source_line()}")
    before = aten.alias.default(self_.primal)  # the old shape, for deriving tangents later
    rest = tuple(primals[1:])
    none_rest = (None,) * len(rest)

    def reshaped(t):
        return jvp_op(fop, (before,) + rest, (t,) + none_rest)[1]
    t = self_._tangent
    registry.call_op(func, primals)
    _on_wrapper_metadata(func, args, kwargs or {})
    if t is not None:
        self_._tangent = reshaped(t)
    if self_._view_of is not None:
        base, derive = self_._view_of
        self_._view_of = (base, lambda bt, derive=derive: reshaped(derive(bt)))
    return self_


def _requires_grad(*trees) -> bool:
    """Whether a real tensor among the trees requires grad. Fake tensors compute no values
    (dynamo propagating shapes through a region it compiles, whose JVP graph autograd does
    see): autograd need not record for them."""
    for tree in trees:
        for x in tree:
            if isinstance(x, torch.Tensor):
                if x.requires_grad:
                    return not isinstance(x, FakeTensor)
            elif isinstance(x, (list, tuple)):
                for y in x:
                    if isinstance(y, torch.Tensor) and y.requires_grad:
                        return not isinstance(y, FakeTensor)
    return False


def _wrap(func, out, tout, mode, view_base, primals, level, index=None):
    if isinstance(out, torch.Tensor):
        view_of = None if view_base is None else (view_base, _view_deriver(func, primals, index))
        if tout is None and mode is None and view_of is None:
            return out
        if tout is None and not is_differentiable(out):
            return out
        if isinstance(out, Dual):  # (a rule's output on an enclosing level's Duals: the checks apply)
            return Dual(out, tout, chunk=mode.chunk if mode is not None else None, _view_of=view_of, level=level)
        return Dual._checked_by_caller(out, tout, mode.chunk if mode is not None else None, level, view_of)
    if isinstance(out, (tuple, list)):
        touts = tout if tout is not None else [None] * len(out)
        items = [_wrap(func, o, t, mode, view_base, primals, level, i) for i, (o, t) in enumerate(zip(out, touts))]
        return type(out)(*items) if hasattr(type(out), "_fields") else type(out)(items)
    return out


def _view_deriver(func, primals, index):
    """The view op's own rule applied to a base tangent: a real view of that tangent."""
    rest = tuple(primals[1:])
    tangents_rest = (None,) * len(rest)

    def derive(base_tangent):
        # (a view autograd tracks, in grad mode: a value written through it later must
        # reach the base tangent's history too; derive may run inside a dispatch)
        recorded = _grad_enabled() and not isinstance(base_tangent, Dual)
        with above_dispatch() if recorded else contextlib.nullcontext():
            _, t = jvp_op(func, (primals[0],) + rest, (base_tangent,) + tangents_rest)
        return t if index is None else t[index]
    return derive


# ---------------------------------------------------------------------------------------
# In-place and out= ops: run the functional overload's rule, then write primal and tangent.
# ---------------------------------------------------------------------------------------

def functional_overload(func):
    """The out-of-place overload an in-place or out= op computes (None: none exists; not
    remembered, so an overload registered later is found)."""
    return _functional_overload_found(func) or _find_functional_overload(func)


@registry.per_op
def _functional_overload_found(func):
    return _find_functional_overload(func)


def _find_functional_overload(func):
    schema = func._schema
    packet_name = schema.name.split("::")[1]
    ns = getattr(torch.ops, func.namespace)
    is_out = any(a.is_out for a in schema.arguments)
    if is_out:
        base = getattr(ns, packet_name, None)
        want = [a.name for a in schema.arguments if not a.is_out]
    else:
        base = getattr(ns, packet_name[:-1], None) if packet_name.endswith("_") else None
        want = [a.name for a in schema.arguments]
    # functionalization's own counterparts (normal_ -> normal_functional) come last
    bases = [b for b in (base, getattr(ns, packet_name[:-1] + "_functional", None) if not is_out else None) if b]
    for b in bases:
        candidates = [func._overloadname] + [o for o in b.overloads() if o != func._overloadname]
        for name in candidates:
            op = getattr(b, name, None)
            if op is None or op._schema.is_mutable:
                continue
            if [a.name for a in op._schema.arguments] == want:
                return op
    return None


@registry.per_op
def _written_and_kept(func):
    """(the arguments a mutating op writes, the arguments its functional twin takes)"""
    args = func._schema.arguments
    return ([i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write],
            [i for i, a in enumerate(args) if not a.is_out])


def _mutating(func, full, primals, tangents, mode, level):
    written, keep = _written_and_kept(func)
    if not any(t is not None for t in tangents):
        # Nothing active flows in, the mutated tensors had no tangent: plain primal op.
        registry.call_op(func, primals)
        return _return_mutated(func, full, written)
    fop = functional_overload(func)
    if fop is None:
        raise registry.NoRuleError(
            f"torch_fwd: in-place/out= op {func} has no functional counterpart to take its rule "
            f"from.\n  at {user_source_line()}")
    if for_autograd():
        # autograd may save what the rule reads for its backward, and the write below
        # changes the targets in place: the rule reads copies of them (as autograd keeps
        # the original self of an in-place op that needs it), in both paths
        primals, tangents = _copies_of(written, primals), _copies_of(written, tangents)
    out, tout = jvp_op(fop, tuple(primals[i] for i in keep), tuple(tangents[i] for i in keep))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    touts = tout if isinstance(tout, (tuple, list)) else (tout,) * len(outs)
    chunk = _chunk_of(full, mode, level)
    for target_index, value, tvalue in zip(written, outs, touts):
        _write(func, full[target_index], value, tvalue, chunk, level)
    return _return_mutated(func, full, written)


def _copies_of(indices, values):
    return tuple(v.clone() if i in indices and isinstance(v, torch.Tensor) else v for i, v in enumerate(values))


def _return_mutated(func, full, written):
    rets = [full[i] for i in written]
    if len(func._schema.returns) == 0:
        return None
    return rets[0] if len(rets) == 1 else tuple(rets)


def _resize_out(func, target, shape, level):
    """out= buffers of the wrong size are resized, as PyTorch's out= kernels do; a Dual's
    own metadata follows (_on_wrapper_metadata) and its tangent starts afresh."""
    if _mine(target, level):
        if target._view_of is not None:
            raise RuntimeError(f"torch_fwd: {func} would resize an out= tensor that is a view\n"
                               f"  at {user_source_line()}")
        target.primal.resize_(shape)
        _on_wrapper_metadata(aten.resize_.default, (target, shape), {})
        target._tangent = None
    else:
        target.resize_(shape)


def _write(func, target, value, tvalue, chunk, level):
    if isinstance(value, torch.Tensor) and tuple(target.shape) != tuple(value.shape):
        _resize_out(func, target, value.shape, level)
    if _mine(target, level):
        target.primal.copy_(value)
        view_of = target._view_of
        if view_of is not None and target.tangent is not None:
            base = view_of[0]
            if base.tangent is not None and not shares_storage(target.tangent, base.tangent):
                raise RuntimeError(
                    f"torch_fwd: {func} writes through a view whose tangent could not be formed as a "
                    f"view of its base's tangent (an unusual memory layout); the write would not reach "
                    f"the base.\n  at {user_source_line()}")
        if tvalue is None:
            t = target.tangent
            if t is not None:
                t.zero_()
        else:
            target.ensure_tangent(chunk).copy_(tvalue)
        return
    if tvalue is not None:  # refused before anything is written
        if _levels.break_untracked_writes and isinstance(target, FakeTensor):
            # Fake tensors while Duals run under dynamo (breaking_untracked_writes): dynamo
            # propagating shapes through a region where the region may have created the
            # target itself (torch.zeros). Told that the op cannot run on fake tensors,
            # dynamo ends the region before it: the region's outputs become Duals and the
            # write runs between regions, where a target the function made tracks it and
            # any other is refused as below.
            from torch._subclasses.fake_tensor import UnsupportedOperatorException
            raise UnsupportedOperatorException(func)
        raise UntrackedWrite(
            f"torch_fwd: an in-place write puts a value that has a tangent into a tensor (or a view of one) "
            f"torch_fwd does not track (from outside the differentiated function, e.g. a global or a module "
            f"buffer); its tangent would be lost.\n  at {user_source_line()}")
    target.copy_(value)


# ---------------------------------------------------------------------------------------
# Running a function on (primal, tangent) pairs: used by jvp's eager path and by the
# decomposition fallback of both paths.
# ---------------------------------------------------------------------------------------

def run_with_duals(fn, args, kwargs, targs, tkwargs, dual_mode=True):
    """Call ``fn`` with Dual-wrapped arguments under a DualMode of a new innermost level
    (``dual_mode=False``: no mode, for a function run by dynamo, which skips every frame
    under a dispatch mode; tensors it creates are then not tracked);
    return (out, tangent_out), both mirroring fn's output (tangent leaves None where zero).
    Arguments may be Duals of enclosing levels: they are wrapped again, and come back out
    still carrying their own levels' tangents (nested differentiation)."""
    chunk = None
    # (a flat tuple of tensors, the common case, without pytree's walk)
    leaves = targs if not tkwargs and all(isinstance(t, torch.Tensor) for t in targs) else \
        pytree.tree_leaves((targs, tkwargs))
    for t in leaves:
        if isinstance(t, torch.Tensor):
            chunk = t.shape[0]
            break
    if chunk is None:
        return fn(*args, **kwargs), None

    with entered_level() as level:
        dtensor = _dtensor_class()

        def wrap(p, t):
            if dtensor is not None and isinstance(p, dtensor):
                return _dtensor_of_dual(p, t, chunk, level)
            if isinstance(p, torch.Tensor):
                return Dual(p, t, chunk=chunk, level=level)
            return p

        def wrap_tree(ps, ts):
            if isinstance(ps, (list, tuple)):
                ts = ts if ts is not None else [None] * len(ps)
                return type(ps)(wrap_tree(p, t) for p, t in zip(ps, ts))
            if isinstance(ps, dict):
                return {k: wrap_tree(v, (ts or {}).get(k)) for k, v in ps.items()}
            return wrap(ps, ts)

        dargs = wrap_tree(tuple(args), tuple(targs))
        dkwargs = wrap_tree(dict(kwargs), dict(tkwargs))
        if dual_mode:
            with DualMode(chunk, level):
                out = fn(*dargs, **dkwargs)
        else:
            out = fn(*dargs, **dkwargs)
        return unwrap_tree(out, level)


def unwrap_tree(out, level=None):
    """(primals, tangents) of a pytree of Duals of ``level`` (default: the innermost level
    among its leaves); other leaves are primals with no tangent."""
    if isinstance(out, Dual) and (level is None or out._level == level):
        return out.primal, out.tangent
    flat, spec = pytree.tree_flatten(out)
    if level is None:
        level = innermost_level(flat)
    prim = [x.primal if _mine(x, level) else x for x in flat]
    tan = [x.tangent if _mine(x, level) else None for x in flat]
    dtensor = _dtensor_class()
    if dtensor is not None:
        for i, x in enumerate(flat):
            if isinstance(x, dtensor):
                prim[i], tan[i] = _split_dtensor(x, level)
    return pytree.tree_unflatten(prim, spec), pytree.tree_unflatten(tan, spec)
