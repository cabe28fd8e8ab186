"""Capture: a function -> an ATen ``fx.GraphModule``, and the guarded graph path of jvp.

Two captures, both ending in ``make_fx`` over ``torch.func.functionalize`` (ATen ops,
no mutations except trailing copies into mutated inputs):

- ``to_aten(fn, args)``: fake-tensor ``make_fx`` of a function, for ``make_jvp_graph``.
  Data-dependent control flow or ``.item()`` fail loudly under fake tensors.
- ``GuardedCapture``: what ``jvp`` uses. Dynamo (``torch.compile(fullgraph=True,
  dynamic=False)`` with our backend) captures the function once per guard set. Dynamo lifts
  closed-over tensors, globals and module parameters into graph inputs and guards on
  everything the trace specialised on (shapes, dtypes, strides, Python values, module
  state), recompiling when a guard fails: a cached graph is never reused for inputs or
  state it was not valid for. The backend lowers each graph to ATen; the JVP graph is
  built per (activity pattern, chunk size, rule-table generation).

Tangents reach the compiled graph through a thread-local side table keyed by the
identity of the primal tensors, and come back the same way keyed by the outputs.
"""
from __future__ import annotations

import inspect
import os
import threading
import traceback
import types

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from . import registry
from .backend import build_compiled_jvp_graph
from .engine import building_for_autograd
from .transform import (STOP_GRADIENT, SWITCHES_GRAD_MODE, build_jvp_graph, drop_unit_k, switches_grad_mode,
                        unbatched_tangents)

__all__ = ["to_aten", "GuardedCapture", "CaptureFailed"]


class CaptureFailed(Exception):
    """The function cannot be captured exactly; the caller runs the eager path.
    ``nested_jvp``: because the function calls ``torch_fwd.jvp`` itself. ``user_error``:
    because something raised that may raise eagerly too (the function's own ``raise``,
    which dynamo only traced; a rule's error; outputs that are not tensors): the eager
    path then gives the user that very exception, even where the graph path was asked for.
    ``regions``: because dynamo could not capture the function in one graph (a graph
    break, a branch on a value): it can still be run region by region."""

    def __init__(self, msg, nested_jvp=False, user_error=False, regions=False):
        super().__init__(msg)
        self.nested_jvp = nested_jvp
        self.user_error = user_error
        self.regions = regions


class NestedJvpUnderDynamo(RuntimeError):
    """Raised by ``jvp`` while dynamo traces it: dynamo cannot trace our dispatch mode."""


def _causes(e) -> tuple[bool, bool]:
    """(nested_jvp, user_error) of a failed capture, from its chain of exceptions. Dynamo
    reports an exception raised by the code it traced as a class of its own named after
    it (ObservedValueErrorError, Observed_NestedJvpUnderDynamoError: an ObservedException),
    chained under its Unsupported error; a rule's error while the JVP graph is built comes
    as our own CaptureFailed under dynamo's BackendCompilerFailed."""
    nested = user = False
    while e is not None:
        name = type(e).__name__
        if "NestedJvpUnderDynamo" in name:
            nested = True
        elif name.startswith("Observed") and type(e).__module__.startswith("torch._dynamo"):
            user = True
        elif isinstance(e, CaptureFailed) and e.user_error:
            user = True
        e = e.__cause__ or e.__context__
    return nested, user


def _raised_by_rules(e) -> bool:
    """Whether an exception while a JVP graph is built may come from a rule (and so raise
    eagerly too) rather than from tracing itself (fake tensors, symbolic shapes)."""
    return not type(e).__module__.startswith("torch.")


_import_lock = threading.Lock()
_imported = False

#: Held while make_fx traces (to_aten, the forward-mode pass): torch.fx's tracer patches
#: module-level state (CURRENT_PATCHER, node-meta preservation) that concurrent traces would
#: trample. Traces happen once per signature; running a traced graph takes no lock.
TRACE_LOCK = threading.RLock()


def ensure_compiler_imported():
    """Import dynamo, inductor's config and make_fx's machinery once, under a lock. They are
    imported lazily (a second that ``import torch_fwd`` need not pay); first used from
    several threads at once, their circular imports deadlock or see half-initialised
    modules."""
    global _imported
    if _imported:
        return
    with _import_lock:
        if not _imported:
            import torch._dynamo  # noqa: F401
            import torch._inductor.config  # noqa: F401
            import torch._subclasses.fake_tensor  # noqa: F401
            import torch.fx.experimental.proxy_tensor  # noqa: F401
            import torch.fx.passes.dialect.common.cse_pass  # noqa: F401
            from .dual import hide_dispatch_from_dynamo
            hide_dispatch_from_dynamo()
            _imported = True


def to_aten(fn, args, functionalize: bool = True) -> fx.GraphModule:
    """ATen graph of ``fn`` (functionalized), each node keeping the user's stack trace: for
    a GraphModule from dynamo, its nodes' traces carry over (fx.traceback.preserve_node_meta
    with an Interpreter, as aot_autograd does); for a function, make_fx records them.

    ``functionalize=False`` for functions that may call ``torch_fwd.jvp`` themselves: a
    Dual made inside ``torch.func.functionalize`` wraps a functional tensor whose ops then
    bypass functionalization (make_fx would record the input as a constant). The forward
    pass handles mutations itself, as the eager path does."""
    # (imported here: make_fx pulls in dynamo, ~1 s that `import torch_fwd` need not pay)
    ensure_compiler_imported()
    with TRACE_LOCK:
        return _to_aten(fn, args, functionalize)


def _to_aten(fn, args, functionalize):
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    if isinstance(fn, fx.GraphModule):
        _mark_stop_gradients(fn)
        # A graph from dynamo holds what a user's torch-function mode did while dynamo
        # traced: traced again under that mode, it would be applied twice.
        with torch._C.DisableTorchFunction():
            gm = _make_fx(_Lowering(fn).run, args, functionalize, mode)
        gm.meta[SWITCHES_GRAD_MODE] = switches_grad_mode(fn)
        return gm

    frames = _RecordUserFrames()

    def inner(*a):
        with frames:
            return fn(*a)
    gm = _make_fx(inner, args, functionalize, mode)
    gm.meta[SWITCHES_GRAD_MODE] = frames.switched_grad_mode
    return gm


_DETACH_FUNCTIONS = (torch.detach, torch.Tensor.detach)
_GET_DATA = getattr(getattr(torch._C, "_autograd", None), "_get_data_attr", None)


def _mark_stop_gradients(gm: fx.GraphModule):
    """Mark the user's ``detach()`` and ``x.data`` in a dynamo graph
    (transform.is_stop_gradient): lowered to ATen they may become an ``aten.alias`` (torch
    2.14 decomposes detach) or nothing at all (``.data``: the input itself), which carry
    the input's tangent. (Node meta only: the graph dynamo runs is not changed.)"""
    for n in gm.graph.nodes:
        if (n.op == "call_method" and n.target == "detach") or \
                (n.op == "call_function" and (n.target in _DETACH_FUNCTIONS or n.target is _GET_DATA)):
            n.meta["custom"] = dict(STOP_GRADIENT)


class _Lowering(fx.Interpreter):
    """Runs a dynamo graph for make_fx, ``x.data`` as ``x.detach()`` (the same values
    without history; lowered, ``.data`` would leave no node to carry its mark)."""

    def call_function(self, target, args, kwargs):
        if target is _GET_DATA:
            return args[0].detach()
        return super().call_function(target, args, kwargs)


def _make_fx(inner, args, functionalize, mode):
    from torch.fx.experimental.proxy_tensor import make_fx
    import torch.fx.traceback as fx_traceback
    with mode, fx_traceback.preserve_node_meta():
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        traced = torch.func.functionalize(inner, remove="mutations") if functionalize else inner
        return make_fx(traced, tracing_mode="real")(*fake)


class _RecordUserFrames(TorchFunctionMode):
    """While make_fx traces a plain function, give each node the Python stack of the torch
    call that made it (make_fx itself records only module ``forward`` frames), mark the
    user's detach() calls, and notice a switch of grad mode (transform.SWITCHES_GRAD_MODE)."""

    switched_grad_mode = False  # whether a torch call ran in another grad mode than the first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch.fx.traceback as fx_traceback
        fx_traceback.set_stack_trace(traceback.format_stack()[:-1])
        grad = torch.is_grad_enabled()
        if getattr(self, "grad_mode", grad) != grad:
            self.switched_grad_mode = True
        self.grad_mode = grad
        if func in _DETACH_FUNCTIONS and hasattr(fx_traceback, "annotate"):
            with fx_traceback.annotate(STOP_GRADIENT):  # (see _mark_stop_gradients)
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _Call:
    """What one GuardedCapture.run hands the graphs dynamo calls (one object per call, set
    on the thread's channel in one assignment: per-call cost matters for small functions)."""
    __slots__ = ("tangents", "chunk", "unbatched", "results", "ran", "interpret", "inductor", "inductor_key",
                 "graph_calls")

    def __init__(self, tangents, chunk, interpret, inductor, unbatched=False):
        self.tangents = tangents  # id(primal) -> tangent
        self.chunk = chunk
        # one direction, every tangent (in and out) without the leading K = 1: jvp without
        # chunked, compiled or not (transform.unbatched_tangents, transform.drop_unit_k)
        self.unbatched = unbatched
        # id(tensor) -> tangent (None: zero) of every tensor a graph gave back: an output
        # not among them was made by dynamo's bytecode after the graph (api._rebuilt_tangent)
        self.results = {}
        # (graph inputs, graph outputs) of each graph run: they stay alive until the call
        # ends, so no id in ``results`` can be reused by a tensor made later
        self.graph_calls = []
        self.ran = 0
        # instead of a JVP graph: interpret(aten_gm, args, call) -> outputs (laplacian)
        self.interpret = interpret
        # jvp(compile=...): a key for the Inductor config patches of the JVP graph, and them
        self.inductor_key, self.inductor = inductor if inductor is not None else (None, None)


class _Channel(threading.local):
    call = None  # the _Call of the run in progress on this thread


_channel = _Channel()


_grad_enabled = torch._C.is_grad_enabled


class _CompiledGraph:
    """What our dynamo backend returns for one captured graph."""

    def __init__(self, gm: fx.GraphModule):
        self.torch_gm = gm
        self.aten_gm = None
        self.jvp_graphs: dict = {}
        self.lock = threading.Lock()

    def _aten(self, args):
        if self.aten_gm is None:
            self.aten_gm = to_aten(self.torch_gm, args)
        return self.aten_gm

    def __call__(self, *args):
        ch = _channel.call
        if ch is None:
            # called outside torch_fwd.jvp: the primal function
            return self.torch_gm(*args)
        if ch.interpret is not None:
            with self.lock:
                try:
                    gm = self._aten(args)
                except Exception as e:  # noqa: BLE001
                    raise CaptureFailed(str(e), user_error=_raised_by_rules(e)) from e
            outs = ch.interpret(gm, args, ch)
            ch.ran += 1
            return outs
        # (the map is keyed by the primals' ids: no other argument, tensor or not, is among them)
        get = ch.tangents.get
        tangents = [get(id(a)) for a in args]
        # a graph whose outputs autograd will differentiate is built with rules autograd
        # can differentiate (engine.for_autograd); dynamo guards on grad mode and on
        # requires_grad, so this bit is decided once per compiled graph and call pattern
        grad = _grad_enabled() and any(getattr(a, "requires_grad", False) for a in (*args, *tangents))
        # (jvp(compile=...) asks for the JVP graph compiled by Inductor: a property of the
        # call, not of the capture, so the graph path and the compiled path share dynamo's
        # cache entries and neither can be served the other's graph)
        key = (tuple([t is not None for t in tangents]), ch.chunk, ch.unbatched, registry.generation(), grad,
               ch.inductor_key)
        jg = self.jvp_graphs.get(key)  # (a dict read needs no lock; building one does)
        if jg is None:
            jg = self._build(key, args, tangents, grad, ch)
        outs, touts, mutated = jg(args, tangents)
        results = ch.results
        for o, t in zip(outs, touts):
            results[id(o)] = t
        ch.graph_calls.append((args, outs))
        if mutated:
            for i, t in mutated.items():
                results[id(args[i])] = t
        ch.ran += 1
        return outs

    def _build(self, key, args, tangents, grad, ch):
        with self.lock:
            jg = self.jvp_graphs.get(key)
            if jg is None:
                try:
                    with building_for_autograd(grad):
                        if ch.inductor is not None:
                            jg = build_compiled_jvp_graph(lambda: self._aten(args), args, tangents, key[0],
                                                          ch.chunk, ch.inductor, grad, ch.unbatched)
                        else:
                            jg = build_jvp_graph(self._aten(args), args, key[0], ch.chunk)
                            if ch.unbatched:
                                jg = drop_unit_k(unbatched_tangents(jg))
                            # (a graph autograd will differentiate keeps to Python bindings)
                            jg.trace_when_reused = not grad
                except Exception as e:  # noqa: BLE001 - the eager path reports real errors
                    # (a failure of the lowering itself, e.g. on .item() that fullgraph capture
                    # keeps in the graph, may not recur where dynamo breaks the graph there)
                    by_rules = _raised_by_rules(e)
                    raise CaptureFailed(str(e), user_error=by_rules, regions=not by_rules) from e
                self.jvp_graphs[key] = jg
            return jg


def _backend(gm, example_inputs):
    from .rules.custom import refuse_user_jvp_functions
    name = refuse_user_jvp_functions(gm)
    if name is not None:
        raise CaptureFailed(f"autograd.Function {name} defines jvp, which dynamo would inline past")
    return _CompiledGraph(gm)


class _Settings(threading.local):
    # Many closures of one code object (a lambda made in a loop) are a normal pattern:
    # each is a recompile. Past the limit dynamo must fail loudly, never run the function
    # uncompiled (it would then run twice). One patch object per thread, reused: building
    # one costs more than the rest of a small jvp. Made on first use: importing dynamo
    # takes a second that `import torch_fwd` need not pay.
    patch = None
    compiling = None
    guards = None
    regions = None


_settings = _Settings()

# Guards dynamo leaves out by default, "unsafe" in its own words: a module hook added or
# removed after the capture, one parameter passed where two were. A stale graph would be
# a silently wrong tangent: every capture of ours guards on both (guards are installed
# when a graph is captured, so the patch is needed only then).
_GUARDS = dict(skip_nnmodule_hook_guards=False, skip_no_tensor_aliasing_guards_on_parameters=False)
_LIMITS = dict(recompile_limit=512, accumulated_recompile_limit=8192, fail_on_recompile_limit_hit=True, **_GUARDS)


def _DYNAMO_SETTINGS():
    if _settings.patch is None:
        _settings.patch = torch._dynamo.config.patch(**_LIMITS)
    return _settings.patch


def guard_settings():
    """The guards above alone, for torch.compile'd functions of ours (jvp(compile=...)
    with graph breaks), entered around each call."""
    if _settings.guards is None:
        _settings.guards = torch._dynamo.config.patch(**_GUARDS)
    return _settings.guards


def regions_settings():
    """guard_settings, a frame dynamo fails on runs uncompiled (on its Duals) instead of
    raising, and the raised recompile limits (a frame dynamo gives up on runs uncompiled,
    and so do the frames it calls, where tensors the function creates are not tracked):
    for jvp's path="auto" region by region (api._graph_regions)."""
    if _settings.regions is None:
        _settings.regions = torch._dynamo.config.patch(
            suppress_errors=True, recompile_limit=_LIMITS["recompile_limit"],
            accumulated_recompile_limit=_LIMITS["accumulated_recompile_limit"], **_GUARDS)
    return _settings.regions


def _COMPILING_SETTINGS():
    """The limits above, and no profiler bookkeeping calls in the transformed code
    (``record_runtime_overhead``: two Python calls around every graph call, which only
    label the time in a profiler trace): for calls that reach dynamo only to compile,
    where entering a patch costs nothing next to the compile."""
    if _settings.compiling is None:
        _settings.compiling = torch._dynamo.config.patch(record_runtime_overhead=False, **_LIMITS)
    return _settings.compiling


class GuardedCapture:
    """One per user function: dynamo's guarded cache around our backend."""

    def __init__(self, fn):
        ensure_compiler_imported()
        self.compiled = torch.compile(fn, backend=_backend, fullgraph=True, dynamic=False)
        self.failed_keys: dict = {}  # signature -> CaptureFailed's arguments: why its capture failed
        self.code = getattr(fn, "__code__", None)
        self.direct = _DirectCall.for_function(fn)

    def remember_failure(self, key, unbatched, why):
        """Calls with signature ``key`` (jvp's default path) go to the eager path from now
        on, ``why`` saying so: the function failed even region by region."""
        self.failed_keys[(key, (None, unbatched))] = (why, False, False, False)

    def _near_recompile_limit(self) -> bool:
        """Whether this call could compile past dynamo's default recompile limit (then the
        raised limits apply: entering a config patch costs more than a small jvp, so it is
        entered only when the function's code has nearly as many cache entries as the
        default allows)."""
        if self.code is None:
            return True
        return len(_cache_entries(self.code)) + 1 >= torch._dynamo.config.recompile_limit

    def run(self, args, flat_primals, flat_tangents, chunk, key_fn, interpret=None, inductor=None, unbatched=False):
        """Run fn(*args) through dynamo with tangents attached to ``flat_primals``. Returns
        (output, the run's _Call: its ``results`` and ``graph_calls``) or raises CaptureFailed. ``interpret``: run each
        captured ATen graph with it instead of building a JVP graph (see _Call).
        ``inductor``: (key, Inductor config patches): the JVP graph compiled by Inductor;
        ``unbatched``: with it, tangents in and out have no leading K (chunk is 1)."""
        # the signature is only computed once something has failed for this function
        # (with or without Inductor: a JVP graph Inductor cannot compile fails only that)
        ikey = (inductor[0] if inductor is not None else None, unbatched)
        if self.failed_keys:
            why = self.failed_keys.get((key_fn(), ikey))
            if why is not None:
                raise CaptureFailed(*why)
        if _channel.call is not None:
            raise CaptureFailed("nested torch_fwd.jvp runs eagerly")
        if _global_module_hooks():
            # (not remembered as a failure: once the hooks are gone, the graphs serve again)
            raise CaptureFailed("global module hooks are registered (torch.nn.modules.module."
                                "register_module_forward_hook, ...), which dynamo's guards do not see")
        if len(flat_primals) > 1 and len({id(p) for p in flat_primals}) < len(flat_primals):
            # one tensor passed twice with two tangents: identity cannot tell them apart
            raise CaptureFailed("the same tensor object is passed as two primals")
        ch = _channel.call = _Call({id(p): t for p, t in zip(flat_primals, flat_tangents) if t is not None},
                                   chunk, interpret, inductor, unbatched)
        try:
            # under TRACE_LOCK: while another thread's make_fx traces, torch.fx's global
            # "tracing" flag makes dynamo refuse to run a compiled function
            with TRACE_LOCK:
                out = self.direct(args) if self.direct is not None else _NOT_SERVED
                if out is _NO_ENTRY:
                    # no cache entry's guards passed: dynamo compiles (or raises)
                    with _COMPILING_SETTINGS():
                        out = self.compiled(*args)
                elif out is _NOT_SERVED:
                    if self._near_recompile_limit():
                        with _DYNAMO_SETTINGS():
                            out = self.compiled(*args)
                    else:
                        out = self.compiled(*args)
            if ch.ran == 0:
                # Nothing compiled ran (an empty graph, or dynamo declined): the eager
                # path decides, so that no output is ever given a tangent by guesswork.
                raise CaptureFailed("no graph ran", user_error=_has_non_tensor_leaf(out))
            return out, ch
        except Exception as e:  # noqa: BLE001
            # dynamo could not capture (graph break, data-dependent control flow, a rule
            # missing at trace time, ...): the eager path runs and reports real errors.
            # (the message only is kept: an exception would keep the failed frames' tensors alive)
            if isinstance(e, CaptureFailed):
                self.failed_keys[(key_fn(), ikey)] = (str(e), e.nested_jvp, e.user_error, e.regions)
                raise
            nested, user = _causes(e)
            inside = _broke_inside_torch(e)
            msg = f"{type(e).__name__}: {e}"
            if inside:  # (dynamo's long explanation is about torch's code, not the user's)
                frame = e.real_stack[-1]
                msg = (f"a graph break inside torch ({os.path.relpath(frame.filename, _TORCH_DIR)}:{frame.lineno} "
                       f"in {frame.name}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            why = (msg, nested, user,
                   not (nested or user) and type(e).__module__.startswith("torch._dynamo") and not inside)
            self.failed_keys[(key_fn(), ikey)] = why
            raise CaptureFailed(*why) from e
        finally:
            _channel.call = None


_TORCH_DIR = os.path.dirname(torch.__file__)


def _broke_inside_torch(e) -> bool:
    """Whether dynamo's graph break came from inside torch's own files (a wrapper such as
    DistributedDataParallel: hooks, loggers, weak references and autograd Functions of its
    own, written for eager execution). Such a function runs on the eager path, not region
    by region; a break in the user's code (the innermost frame dynamo reports) does not."""
    stack = getattr(e, "real_stack", None)
    if not stack:
        return False
    return stack[-1].filename.startswith(_TORCH_DIR)


def _has_non_tensor_leaf(out) -> bool:
    return any(not isinstance(x, torch.Tensor) for x in pytree.tree_leaves(out))


def _global_module_hooks():
    """Whether a hook is registered for every module (``register_module_forward_hook`` and
    its kin). Dynamo's guards see a module's own hooks (skip_nnmodule_hook_guards=False
    above) but not these: a graph captured with them, or without them, would be served
    after they change, so the graph path runs only while there are none (the eager path
    runs them as Python does). Their registries have no public reader; one missing
    from a torch release is skipped."""
    for d in _GLOBAL_HOOK_DICTS:
        if d:
            return True
    return False


_GLOBAL_HOOK_DICTS = [d for d in (getattr(torch.nn.modules.module, name, None) for name in (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_always_called",
    "_global_backward_pre_hooks", "_global_backward_hooks")) if isinstance(d, dict)]


def _cache_entries(code):
    """Dynamo's cache entries for ``code``, most recently used first (dynamo is imported
    by the time a GuardedCapture exists)."""
    return torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)


_NO_ENTRY = object()    # no cache entry's guards passed
_NOT_SERVED = object()  # a call _DirectCall does not serve
_UNSEEN = object()      # an entry _DirectCall has not looked at yet

_PLAIN_ARGS_ONLY = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS


class _DirectCall:
    """Dynamo's cache hit without dynamo's frame machinery, for a plain function called
    with positional arguments (trailing parameters with defaults may be left out).

    Each of dynamo's cache entries for a code object (``_debug_get_cache_entry_list``)
    holds its guard manager and the transformed code dynamo runs when the guards pass.
    Dynamo checks the guards against the frame's locals -- the arguments by name, and
    the contents of the closure's cells (``LocalSource(is_derefed_cell_contents=True)``)
    -- so we build that mapping, check the entries made with our backend in dynamo's
    order and run the passing entry's code as a function with the same globals and
    closure: what dynamo itself would run, minus its ~35 us of Python per call. A parameter
    left to its default is in the frame's locals as the default's current value (Python's
    call fills it in; dynamo guards on it like any argument), and the transformed code is
    called with it filled in the same way. No entry
    passing (a first call, a guard failing) returns _NO_ENTRY and dynamo decides as
    always: a recompile, or an error; a call it does not serve returns _NOT_SERVED.
    Entries are read afresh on every call, so ``torch._dynamo.reset()`` or an evicted
    entry can never leave a stale graph behind."""

    def __init__(self, fn):
        self.fn = fn
        self.code = fn.__code__
        self.names = self.code.co_varnames[:self.code.co_argcount]
        self.functions: dict = {}  # transformed code -> function running it

    @classmethod
    def for_function(cls, fn):
        code = getattr(fn, "__code__", None)
        if type(fn) is not types.FunctionType or code is None or code.co_flags & _PLAIN_ARGS_ONLY \
                or code.co_kwonlyargcount or code.co_posonlyargcount:
            return None
        return cls(fn)

    def _function_for(self, entry):
        functions = self.functions
        if len(functions) > 64:  # codes of entries dynamo has dropped
            functions.clear()
        run = None
        if getattr(entry.backend, "compiler_fn", None) is _backend:
            fn = self.fn
            run = types.FunctionType(entry.code, fn.__globals__, fn.__name__, None, fn.__closure__)
        functions[entry.code] = run
        return run

    def __call__(self, args):
        if self.fn.__code__ is not self.code or torch.compiler.is_compiling():
            return _NOT_SERVED
        missing = len(self.names) - len(args)
        if missing:
            defaults = self.fn.__defaults__  # (read per call: it can be reassigned)
            if missing < 0 or defaults is None or missing > len(defaults):
                return _NOT_SERVED
            args = (*args, *defaults[len(defaults) - missing:])
        entries = _cache_entries(self.code)
        if not entries:
            return _NO_ENTRY
        f_locals = dict(zip(self.names, args))
        closure = self.fn.__closure__
        if closure:
            for name, cell in zip(self.code.co_freevars, closure):
                try:
                    f_locals[name] = cell.cell_contents
                except ValueError:  # an empty cell is not among the frame's locals
                    pass
        functions = self.functions
        for entry in entries:
            # (the function running an entry's transformed code is kept by that code, and
            # None for an entry another backend made: one dict read per entry per call)
            run = functions.get(entry.code, _UNSEEN)
            if run is _UNSEEN:
                run = self._function_for(entry)
            if run is not None and entry.guard_manager.check(f_locals):
                return run(*args)
        return _NO_ENTRY
