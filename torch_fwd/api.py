"""Public entry points: jvp, jacfwd, make_jvp_graph."""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import types

import torch
import torch.utils._pytree as pytree

from .backend import (compiled_regions, graph_regions_backend, jvp_patches, quiet_dynamo, reset_regions,
                      torch_fwd_backend)
from .capture import (TRACE_LOCK, CaptureFailed, GuardedCapture, NestedJvpUnderDynamo, ensure_compiler_imported,
                      guard_settings, regions_settings, to_aten)
from .distributed import fsdp_hooks_on_duals
from .dual import Dual, UntrackedWrite, breaking_untracked_writes, is_dtensor, on_dynamo_use, run_with_duals
from .tangent import restride_through_storage, shares_storage, zeros_tangent
from .engine import building_for_autograd
from .transform import build_jvp_graph

__all__ = ["jvp", "jacfwd", "make_jvp_graph", "explain", "JACFWD_MEMORY_BUDGET"]

# Captures by function object (and, for jvp(compile=...) with graph breaks, torch.compile'd
# functions by ("dual", function, options)), least recently used dropped past the bound. (A weak-keyed
# dict would never drop anything: the compiled wrapper holds the function strongly. Dynamo's
# own cache lives on the code object, so a lambda re-made every step recaptures nothing.)
_CAPTURE_CACHE_SIZE = 256
_captures: "collections.OrderedDict" = collections.OrderedDict()
_captures_lock = threading.Lock()
_last_path = threading.local()


def explain() -> str | None:
    """Which path the calling thread's last ``jvp`` took ('graph' or 'eager') and why."""
    return getattr(_last_path, "value", None)


# ---------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------

def _check(primals, tangents, chunked, name="jvp"):
    """Validate (primals, tangents) as jvp takes them; ``name`` starts the messages (hvp,
    linearize's jvp_fn check theirs here too). Returns (flat primals, flat tangents,
    spec, K)."""
    fast = _check_flat(primals, tangents, chunked, name)
    if fast is not None:
        return fast
    if not isinstance(primals, tuple):
        raise TypeError(f"{name}: primals must be a tuple (func is called as func(*primals)), got {type(primals).__name__}")
    if not isinstance(tangents, tuple):
        raise TypeError(f"{name}: tangents must be a tuple matching primals, got {type(tangents).__name__}")
    flat_p, spec_p = pytree.tree_flatten(primals)
    flat_t, spec_t = pytree.tree_flatten(tangents)
    if spec_p != spec_t:
        raise ValueError(f"{name}: tangents have a different pytree structure than primals:\n"
                         f"  primals:  {spec_p}\n  tangents: {spec_t}")
    chunk = None
    for i, (p, t) in enumerate(zip(flat_p, flat_t)):
        where = f"primal leaf {i}"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: {where} is a {type(p).__name__}; primals must be tensors "
                            f"(pass other values through a closure or functools.partial)")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: the tangent of {where} is a {type(t).__name__}, expected a Tensor")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"{name}: {where} has dtype {p.dtype}; only floating or complex primals have tangents")
        if t.dtype != p.dtype:
            raise TypeError(f"{name}: the tangent of {where} has dtype {t.dtype}, its primal {p.dtype}")
        if t.device != p.device:
            raise ValueError(f"{name}: the tangent of {where} is on {t.device}, its primal on {p.device}")
        if chunked:
            if t.dim() != p.dim() + 1 or tuple(t.shape[1:]) != tuple(p.shape):
                raise ValueError(f"{name}(chunked=True): the tangent of {where} has shape {tuple(t.shape)}; "
                                 f"expected (K, *{tuple(p.shape)})")
            if chunk is None:
                chunk = t.shape[0]
            elif t.shape[0] != chunk:
                raise ValueError(f"{name}(chunked=True): the tangent of {where} has K = {t.shape[0]}, "
                                 f"earlier tangents K = {chunk}; every tangent needs the same K")
        elif tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{name}: the tangent of {where} has shape {tuple(t.shape)}, its primal {tuple(p.shape)}")
    if chunked and chunk == 0:
        raise ValueError(f"{name}(chunked=True): K = 0 directions")
    return flat_p, flat_t, spec_p, chunk if chunked else 1


_flat_specs: dict = {}


def _check_flat(primals, tangents, chunked, name):
    """_check's result without pytree for the common case -- tuples of plain floating
    tensors, same shapes, dtypes and devices, none wrapped by a functorch transform or
    functional -- or None (then _check looks closely and says what is wrong, and
    _inside_another_transform what is nested). Per-call cost matters for small functions."""
    if type(primals) is not tuple or type(tangents) is not tuple or len(primals) != len(tangents):
        return None
    chunk = None
    for p, t in zip(primals, tangents):
        if type(p) is not torch.Tensor or type(t) is not torch.Tensor or t.dtype != p.dtype \
                or not p.is_floating_point() or t.device != p.device \
                or _is_wrapped(p) or _is_wrapped(t) or _is_functional(p) or _is_functional(t):
            return None
        if chunked:
            k = t.shape[0] if t.dim() == p.dim() + 1 else -1
            if t.shape[1:] != p.shape or k <= 0 or (chunk is not None and k != chunk):
                return None
            chunk = k
        elif t.shape != p.shape:
            return None
    n = len(primals)
    spec = _flat_specs.get(n)
    if spec is None:
        spec = _flat_specs[n] = pytree.tree_structure((0,) * n)
    if chunked and chunk is None:
        return None
    return list(primals), list(tangents), spec, chunk if chunked else 1


def _signature(flat_p, chunk):
    return tuple((tuple(p.shape), p.dtype, p.device, p.stride(), p.requires_grad) for p in flat_p) + (chunk,)


def _capture_for(func):
    key = _same_function_key(func)
    return _cached(func, GuardedCapture) if key is None else _cached(key, lambda _k: GuardedCapture(func))


def _same_function_key(func):
    """A key shared by function objects that are the same function: the same code over the
    same closure cells, globals and defaults (a lambda written inside a training loop is
    a new object each step, and would be captured, or fail to be, anew each step). The
    cache holds the first such object, and so its cells: their ids cannot be reused while
    the key lives. None for other callables (keyed by themselves)."""
    if isinstance(func, types.MethodType):
        inner = _same_function_key(func.__func__)
        return None if inner is None else ("method", id(func.__self__), inner)
    if type(func) is not types.FunctionType:
        return None
    return ("function", func.__code__, tuple(id(c) for c in func.__closure__ or ()), id(func.__globals__),
            id(func.__defaults__), id(func.__kwdefaults__))


def _cached(key, make):
    """``_captures[key]``, made by ``make(key)`` on a miss; least recently used dropped past
    the bound. An unhashable key (a function object that is not hashable) is not cached."""
    # (a hit is read without the lock: each OrderedDict operation is one C call under the
    # GIL, and a key another thread drops in between is simply made again below)
    try:
        obj = _captures.get(key)
    except TypeError:
        return make(key)
    if obj is not None:
        try:
            _captures.move_to_end(key)
            return obj
        except KeyError:
            pass
    with _captures_lock:
        obj = _captures.get(key)
        if obj is None:
            obj = _captures[key] = make(key)
            while len(_captures) > _CAPTURE_CACHE_SIZE:
                _captures.popitem(last=False)
        else:
            _captures.move_to_end(key)
        return obj


# ---------------------------------------------------------------------------------------
# jvp
# ---------------------------------------------------------------------------------------

def jvp(func, primals, tangents, *, has_aux=False, chunked=False, path="auto", compile=False):
    """Jacobian-vector product of ``func`` at ``primals`` along ``tangents``.

    Same contract as ``torch.func.jvp``: returns ``(func(*primals), tangent_out)`` (plus
    ``aux`` with ``has_aux``). With ``chunked=True`` every tangent leaf has a leading
    dimension K (K directions in one pass) and so does every output tangent.

    ``path``: "auto" (the graph path where dynamo captures the function exactly, else the
    eager path), "graph" (raise if it cannot be captured) or "eager".

    ``compile``: True, or a dict of ``torch.compile`` arguments (``fullgraph``, ``mode``,
    ``options``): ``func`` runs under ``torch.compile`` with the "torch_fwd" backend
    (torch_fwd/backend.py), each captured graph's JVP compiled by Inductor, the code between
    graph breaks carrying its tangents eagerly. A ``func`` that is itself the result of
    ``torch.compile`` gets the same: the function it wraps is compiled with our backend
    (its ``fullgraph`` kept).
    """
    if not callable(func):
        raise TypeError(f"jvp: func must be callable, got {type(func).__name__}")
    if path not in ("auto", "graph", "eager"):
        raise ValueError(f"jvp: path must be 'auto', 'graph' or 'eager', got {path!r}")
    if torch.compiler.is_dynamo_compiling():
        # dynamo is capturing a function that calls jvp (an enclosing jvp's graph path):
        # it cannot trace our dispatch mode, so the capture is refused here, loudly; the
        # enclosing jvp then runs eagerly or traces with make_fx (path="graph")
        raise NestedJvpUnderDynamo("torch_fwd.jvp cannot be captured by dynamo (a nested jvp)")
    compile_opts = _compile_options(func, compile, path)
    checked = _check_flat(primals, tangents, chunked, "jvp")
    if checked is not None:
        flat_p, flat_t, spec, chunk = checked
        # (plain tensors, none a Dual or wrapped: only a dispatch mode makes this jvp nested)
        nested = _dispatch_modes() > 0
    else:
        flat_p, flat_t, spec, chunk = _check(primals, tangents, chunked)
        nested = _inside_another_transform(flat_p, flat_t)
    dtensors = path != "eager" and any(is_dtensor(x) for x in flat_p)
    if dtensors:
        if path == "graph" or compile_opts is not None:
            raise ValueError(f"jvp: DTensor primals run on the eager path (their tangents are carried inside "
                             f"their local tensors), which path={path!r}, compile={compile!r} rule out")
        path = "eager"
    # K = 1 inside; tangents contiguous (the JVP graph is traced for contiguous tangents).
    # A JVP graph, compiled or not, takes and gives one direction's tangents as they are
    # (the K added and removed inside it, where it costs nothing or is rewritten away:
    # transform.unbatched_tangents, transform.drop_unit_k); the eager path keeps its K.
    unbatched = not chunked and not nested and path != "eager"
    ts = [t.contiguous() for t in flat_t] if unbatched else \
        [(t if chunked else t.unsqueeze(0)).contiguous() for t in flat_t]
    primal_args = primals if spec is _flat_specs.get(len(flat_p)) else pytree.tree_unflatten(flat_p, spec)

    out = None
    with_k = True  # whether the output tangents have their K (a compiled unbatched graph's do not)
    if nested:
        # Inside another jvp (or a make_fx trace) the eager path runs at a new level: the
        # enclosing level differentiates what it does (or make_fx records it). A graph of
        # its own would see the enclosing level's Duals it closes over as constants.
        why = "eager (inside another transform)"
    elif compile_opts is not None:
        out, why, with_k = _compiled(func, compile_opts, primal_args, flat_p, ts, spec, chunk, has_aux, unbatched)
    elif path in ("auto", "graph"):
        cap = _capture_for(func)
        try:
            raw, ch = cap.run(primal_args, flat_p, ts, chunk, lambda: _signature(flat_p, chunk),
                              unbatched=unbatched)
            out, with_k = _graph_outputs(raw, ch, flat_p, ts, chunk, has_aux, unbatched)
            why = "graph"
        except CaptureFailed as e:
            ts = _batched(ts, unbatched)
            if path == "graph" and e.nested_jvp:
                # dynamo cannot capture a nested jvp; make_fx can (the inner jvp runs its
                # eager path under it and is recorded as ATen ops). Nothing is cached:
                # without dynamo's guards a trace is only valid for these very inputs.
                out = _traced_once(func, flat_p, ts, spec, chunk, has_aux)
                why = "graph (traced once: the function calls jvp)"
            elif path == "graph":
                if e.user_error:
                    # the function's own exception (dynamo only traced its raise), a rule's, or
                    # outputs that are not tensors: the eager path raises it as the user wrote it
                    _eager(func, flat_p, ts, spec, chunk, has_aux)
                raise RuntimeError(f"jvp(path='graph'): the function could not be captured: {e}") from None
            elif e.nested_jvp:
                why = "eager (the function calls jvp, which dynamo cannot capture)"
            elif e.regions:
                out, why = _graph_regions(cap, func, flat_p, ts, spec, chunk, has_aux, unbatched, e)
            else:
                why = f"eager ({e})"
    else:
        why = "eager (DTensor primals)" if dtensors else "eager (requested)"
    if out is None:
        out = _eager(func, flat_p, ts, spec, chunk, has_aux)
    _last_path.value = why  # after the call: a jvp nested inside reported its own path first
    res, tres, aux = out
    if not chunked and with_k:
        tres = tres.squeeze(0) if isinstance(tres, torch.Tensor) else \
            pytree.tree_map(lambda t: t.squeeze(0) if isinstance(t, torch.Tensor) else t, tres)
    return (res, tres, aux) if has_aux else (res, tres)


# ---------------------------------------------------------------------------------------
# jvp(compile=...): the torch_fwd dynamo backend
# ---------------------------------------------------------------------------------------

_COMPILE_KEYS = ("fullgraph", "mode", "options", "dynamic")


def _compile_options(func, compile, path):
    """torch.compile's arguments for jvp(compile=...), or None for no compilation. A func
    that torch.compile made is compiled again, from what it wraps, with our backend."""
    inner = getattr(func, "_torchdynamo_orig_callable", None)
    if compile is False and inner is None:
        return None
    if compile is True or compile is False:
        opts = {}
    elif isinstance(compile, dict):
        unknown = [k for k in compile if k not in _COMPILE_KEYS]
        if unknown:
            raise ValueError(f"jvp: compile takes the torch.compile arguments {list(_COMPILE_KEYS)}, got {unknown}")
        opts = dict(compile)
    else:
        raise TypeError(f"jvp: compile must be True, False or a dict of torch.compile arguments, "
                        f"got {type(compile).__name__}")
    if path == "eager":
        raise ValueError("jvp: path='eager' and compile cannot be combined")
    if inner is not None and "fullgraph" not in opts:
        ctx = getattr(func, "dynamo_ctx", None) or next(
            (c.cell_contents for c in (getattr(func, "__closure__", None) or ())
             if hasattr(c.cell_contents, "fullgraph")), None)
        if getattr(ctx, "fullgraph", False):
            opts["fullgraph"] = True
    return opts


def _unwrap_compiled(func):
    return getattr(func, "_orig_mod", None) or getattr(func, "_torchdynamo_orig_callable", None) or func


def _compiled_for(func, opts):
    """func under torch.compile with the torch_fwd backend (graph breaks allowed)."""
    func = _unwrap_compiled(func)

    def make(_key):
        ensure_compiler_imported()
        return torch.compile(func, backend=torch_fwd_backend, **opts)
    return _cached(("dual", func, repr(sorted(opts.items()))), make)


def _compiled(func, opts, primal_args, flat_p, ts, spec, chunk, has_aux, unbatched=False):
    """jvp(compile=...). First as the graph path does: dynamo captures func whole on the
    primals (tangents beside them, capture.py), and the JVP graph is compiled by Inductor:
    nothing but dynamo's guard check and the compiled graph runs per call. A function that
    cannot be captured whole (a graph break) runs under torch.compile with the torch_fwd
    backend on Duals instead (backend.py): its graphs compiled, the code between them
    carrying tangents eagerly.

    ``unbatched``: ``ts`` are one direction's tangents without the leading K = 1, and so are
    the tangents the captured graphs give. Returns ((output, tangents, aux), how the path
    is explained, whether the tangents have their K)."""
    if opts.get("dynamic") is None:
        cap = _capture_for(_unwrap_compiled(func))
        try:
            raw, ch = cap.run(primal_args, flat_p, ts, chunk, lambda: _signature(flat_p, chunk),
                              inductor=jvp_patches(opts.get("mode"), opts.get("options")),
                              unbatched=unbatched)
            out, with_k = _graph_outputs(raw, ch, flat_p, ts, chunk, has_aux, unbatched)
            return out, "compiled (1 region)", with_k
        except CaptureFailed as e:
            if e.nested_jvp:
                return _eager(func, flat_p, _batched(ts, unbatched), spec, chunk, has_aux), \
                    "eager (the function calls jvp, which dynamo cannot capture)", True
    return (*_compiled_duals(func, opts, flat_p, _batched(ts, unbatched), spec, chunk, has_aux), True)


def _batched(ts, unbatched):
    return [t.unsqueeze(0) for t in ts] if unbatched else ts


def _compiled_duals(func, opts, flat_p, ts, spec, chunk, has_aux):
    """func compiled with the torch_fwd backend, called on Duals of a new level by the
    eager path's machinery without its DualMode (a dispatch mode makes dynamo skip every
    frame)."""
    cf = _compiled_for(func, opts)
    try:
        out, (n, eager) = _on_duals(cf, guard_settings, flat_p, ts, spec, chunk, has_aux)
    except Exception as e:
        # Part of the function may have run already (an earlier compiled region):
        # rerunning it eagerly could repeat its side effects, so this is an error.
        if _is_dynamo_error(e) and not opts.get("fullgraph"):
            raise RuntimeError(
                f"jvp(compile=...): the function has graph breaks and a region could not be captured "
                f"with its tangents:\n  {' '.join(str(e).split())[:800]}\n"
                f"A common cause: a tensor allocated in one region (torch.zeros) receives values with "
                f"tangents after a graph break. Run with compile=False (the eager path tracks such "
                f"writes), or keep the allocation and the writes in one region.") from e
        raise
    if not eager and n:
        why = f"compiled ({n} region{'s' if n > 1 else ''})"
    elif n:
        why = f"compiled ({n} region{'s' if n > 1 else ''}; {len(eager)} ran eagerly: {'; '.join(eager)})"
    else:
        why = "eager (torch.compile compiled no region with tangents" + (f": {'; '.join(eager)})" if eager else ")")
    return out, why


def _graph_regions(cap, func, flat_p, ts, spec, chunk, has_aux, unbatched, failure):
    """path="auto" for a function dynamo cannot capture in one graph (``failure`` says
    why): dynamo captures it region by region between its graph breaks
    (backend.graph_regions_backend), each region's JVP graph runs through the graph path's
    runner, and only the Python between regions runs, on Duals, through the eager path's
    rules. Errors inside dynamo run that frame eagerly (``suppress_errors``); a frame dynamo
    skips runs on its Duals: every part of the function carries its tangents."""
    def make(_key):
        ensure_compiler_imported()
        return torch.compile(func, backend=graph_regions_backend)
    reason = " ".join(str(failure).split())[:200]
    try:
        out, (n, eager) = _on_duals(_cached(("regions", func), make), regions_settings, flat_p, ts, spec, chunk,
                                    has_aux, quiet=quiet_dynamo)
    except Exception as e:
        # Two failures that are the region-by-region run's own: dynamo failing (a few of its
        # refusals escape suppress_errors), and a frame dynamo ran uncompiled writing a
        # value with a tangent into a tensor it made (untracked there: no DualMode under
        # dynamo). Before any region ran, the eager path runs the function instead (and
        # for calls like it; an UntrackedWrite that is the user's own it raises again);
        # after, the user's code may have run, and is not run twice.
        if not (_is_dynamo_error(e) or isinstance(e, UntrackedWrite)):
            raise
        if compiled_regions()[0]:
            raise RuntimeError(
                f"jvp: running the function region by region failed after a region had run:\n  "
                f"{' '.join(str(e).split())[:800]}\nRun it with path='eager'.") from e
        why = f"region by region failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        cap.remember_failure(_signature(flat_p, chunk), unbatched, f"{why}; not one graph because {reason}")
        return _eager(func, flat_p, ts, spec, chunk, has_aux), f"eager ({why}): {reason}"
    if n:
        why = (f"regions ({n} graph{'s' if n > 1 else ''} run by the graph path, the Python between them "
               f"eagerly{'; ' + str(len(eager)) + ' ran eagerly: ' + '; '.join(eager) if eager else ''}): "
               f"not one graph because {reason}")
    else:
        why = f"eager (no region captured{': ' + '; '.join(eager) if eager else ''}): {reason}"
    return out, why


def _on_duals(cf, settings, flat_p, ts, spec, chunk, has_aux, quiet=contextlib.nullcontext):
    """Run ``cf`` (func under torch.compile with one of our backends) on Duals of a new
    level, dynamo's config ``settings()`` and ``quiet()`` (backend.quiet_dynamo) entered
    around it. Returns (the outputs, the regions' report: backend.compiled_regions)."""
    def call(*args):
        with settings(), quiet(), breaking_untracked_writes():
            return cf(*args)

    reset_regions()
    # (dynamo's default recompile limit: past it, dynamo runs the frame on the Duals
    # eagerly, which is correct)
    with TRACE_LOCK:
        out = _eager(call, flat_p, ts, spec, chunk, has_aux, dual_mode=False)
    return out, compiled_regions()


_run_with_duals = run_with_duals


def _hide_eager_from_dynamo():
    # Once dynamo is in use, a jvp run eagerly between two graphs of an enclosing jvp's
    # regions (a nested jvp after a graph break) would have its own frames compiled by
    # dynamo, one by one. (A function torch.compile made, as _on_duals runs, turns dynamo
    # back on for itself.)
    global _run_with_duals
    _run_with_duals = torch.compiler.disable(run_with_duals, recursive=True)


on_dynamo_use(_hide_eager_from_dynamo)


def _is_dynamo_error(e) -> bool:
    return type(e).__module__.startswith("torch._dynamo")


def _inside_another_transform(flat_p, flat_t) -> bool:
    """Whether this jvp runs inside another one (or inside a make_fx trace): its inputs
    are Duals, functional or fake tensors, or a dispatch mode is active. Its eager path
    then runs, at a new level, and the enclosing transform differentiates or records it."""
    both = flat_p + flat_t
    for x in both:
        if _is_wrapped(x) or _is_functional(x):
            # a Dual cannot wrap these: its ops would skip the wrapper's transform
            raise NotImplementedError(
                "torch_fwd.jvp inside a torch.func transform (vmap, grad, jvp, functionalize) is not "
                "supported: call torch_fwd's transforms outside torch.func's, or use torch_fwd.jacfwd / "
                "chunked=True instead of vmap")
    if _dispatch_modes() > 0:
        return True
    for x in both:
        if type(x) is not torch.Tensor and isinstance(x, Dual):
            return True
    return False


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_functional = torch._is_functional_tensor
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _traced_once(func, flat_p, ts, spec, chunk, has_aux):
    """The graph path without dynamo: make_fx traces ``func`` at these inputs, the
    forward-mode pass builds its JVP graph, which runs once and is dropped."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in flat_p + ts)
    graph, out_spec, consts = trace_jvp_graph(func, flat_p, spec, chunk, for_autograd=grad)
    outs, touts, _ = graph(flat_p, ts)
    raw = pytree.tree_unflatten(_fill(outs, consts), out_spec)
    res, aux = _split_aux(raw, has_aux)
    n_res = len(pytree.tree_leaves(res))
    flat_t = _fill(touts, consts)[:n_res]
    return res, _collect(res, lambda i, o: flat_t[i], chunk), aux


def trace_jvp_graph(func, flat_p, spec, chunk, active=None, for_autograd=True):
    """make_fx (fake tensors, functionalized) of ``func(*unflatten(flat_p))`` and its JVP
    graph for tangents on the ``active`` primals (default: every floating one). Returns
    (JVPGraph over the tensor leaves of the output, the output's spec, {leaf index: the
    non-tensor leaves as traced}). ``for_autograd``: build it with rules autograd can
    differentiate (engine.for_autograd)."""
    consts: dict = {}
    box: dict = {}

    def flat_fn(*flat):
        out = func(*pytree.tree_unflatten(list(flat), spec))
        leaves, box["spec"] = pytree.tree_flatten(out)
        consts.clear()
        consts.update({i: x for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)})
        return tuple(x for x in leaves if isinstance(x, torch.Tensor))

    if active is None:
        active = [p.is_floating_point() or p.is_complex() for p in flat_p]
    aten_gm = to_aten(flat_fn, flat_p, functionalize=False)
    with building_for_autograd(for_autograd):
        graph = build_jvp_graph(aten_gm, flat_p, active, chunk)
    return graph, box["spec"], dict(consts)


def _fill(tensors, consts):
    """Tensor leaves back among the traced non-tensor leaves."""
    it = iter(tensors)
    n = len(tensors) + len(consts)
    return [consts[i] if i in consts else next(it) for i in range(n)]


def _graph_output_tangent(o, ch, flat_p, ts):
    """The tangent of an output of a captured function: what a graph gave for it (None:
    zero), or, for an output dynamo made after its graph, :func:`_rebuilt_tangent`."""
    results = ch.results
    if id(o) in results:
        return results[id(o)]
    if o.numel() == 0:
        return None
    return _rebuilt_tangent(o, ch, flat_p, ts)


def _rebuilt_tangent(o, ch, flat_p, ts):
    """Dynamo returns a tensor it can name from what the function read (an input, a
    global, an attribute of one: ``x.T``, ``x.mT``, ``x.data``) by building it in bytecode
    after the graph, not from the graph. Its tangent is that of the tensor it was built
    from, through the same view, which is found by memory, exactly or not at all:

    - an input itself: its tangent;
    - not an autograd view (``x.data``): it shares memory but carries no tangent;
    - a view: its source is a tensor the function read (an input or a graph input) whose
      autograd base is the view's and whose memory holds every element of it. One such
      source: its tangent (zero for a graph input that is not an input of ``jvp``)
      restrided as the output is. Several, and some have a tangent: the output cannot be
      told apart, and that is an error, never a guess."""
    tangent_of = {id(p): t for p, t in zip(flat_p, ts)}
    tangent_of.update({k: v for k, v in ch.results.items() if k in tangent_of})  # updated in place
    if id(o) in tangent_of:  # an input returned as it is
        return tangent_of[id(o)]
    if o._base is None:  # (not o._is_view(): a Dual's view answers through its primal)
        return None
    read = {id(p): p for p in flat_p}
    for args, _ in ch.graph_calls:
        read.update({id(a): a for a in args if isinstance(a, torch.Tensor)})
    base = o._base
    sources = [x for x in read.values()
               if (x is base or x._base is base) and o.dtype == x.dtype and _holds(x, o)]
    with_tangent = [x for x in sources if tangent_of.get(id(x)) is not None]
    if not with_tangent:
        return None
    if len(sources) > 1:
        raise RuntimeError(
            f"torch_fwd: an output of shape {tuple(o.shape)} is a view dynamo rebuilt after the graph, and "
            f"{len(sources)} tensors the function read hold its memory ({len(with_tangent)} with a tangent): "
            f"which one it views cannot be told, so neither is its tangent. Return a copy (.clone()) or use "
            f"path='eager'.")
    x = sources[0]
    return restride_through_storage(tangent_of[id(x)], x, o.shape, o.stride(), o.storage_offset())


def _holds(x, o) -> bool:
    """Whether every element of ``o`` lies in memory ``x`` spans (they share storage)."""
    if not shares_storage(o, x):
        return False
    n = x.untyped_storage().nbytes() // x.element_size()
    mask = torch.zeros(n, dtype=torch.bool)
    mask.as_strided(tuple(x.shape), tuple(x.stride()), x.storage_offset()).fill_(True)
    return bool(mask.as_strided(tuple(o.shape), tuple(o.stride()), o.storage_offset()).all())


def _graph_outputs(raw, ch, flat_p, ts, chunk, has_aux, unbatched=False):
    """((output, its tangents, aux), whether the tangents have their K) of a captured
    function's run, from the tangents its graphs left in ``ch.results``; ``unbatched``:
    those and ``ts`` are one direction's, without K."""
    res, aux = _split_aux(raw, has_aux)
    results = ch.results
    if type(res) is torch.Tensor:
        # (the common case, without _collect's closure and pytree)
        t = results.get(id(res))
        if t is not None and (t.shape == res.shape if unbatched else
                              t.shape[0] == chunk and t.shape[1:] == res.shape):
            return (res, t, aux), not unbatched
    if unbatched:
        # (pytree outputs, outputs dynamo makes outside the graph: as with K)
        ch.results = {k: (v.unsqueeze(0) if v is not None else None) for k, v in results.items()}
        ts = _batched(ts, True)
    return (res, _collect(res, lambda i, o: _graph_output_tangent(o, ch, flat_p, ts), chunk), aux), True


def _split_aux(raw, has_aux):
    if not has_aux:
        return raw, None
    if not (isinstance(raw, tuple) and len(raw) == 2):
        raise TypeError("jvp(has_aux=True): func must return a tuple (output, aux)")
    return raw[0], raw[1]


def _collect(res, tangent_for, chunk):
    """The output tangents (zeros where symbolic) mirroring ``res``; ``tangent_for(i, o)``
    gives the tangent of output leaf i, or None."""
    if type(res) is torch.Tensor:
        t = tangent_for(0, res)
        if t is not None and t.shape[0] == chunk and t.shape[1:] == res.shape:
            return t
    flat, spec = pytree.tree_flatten(res)
    touts = []
    for i, o in enumerate(flat):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"jvp: func must return tensors (or pytrees of them); output leaf {i} is a "
                            f"{type(o).__name__}")
        t = tangent_for(i, o)
        if t is None:
            t = zeros_tangent(o, chunk)
        elif tuple(t.shape) != (chunk,) + tuple(o.shape):
            # a broken invariant inside torch_fwd: never hand it back as an answer
            raise RuntimeError(f"torch_fwd internal error: output leaf {i} has shape {tuple(o.shape)} but its "
                               f"tangent {tuple(t.shape)}; please report this with the function")
        touts.append(t)
    return pytree.tree_unflatten(touts, spec)


def _eager(func, flat_p, ts, spec, chunk, has_aux, dual_mode=True):
    # clone: an in-place op on an input inside func must not write into the caller's tangent
    cloned = [t.clone() for t in ts]
    if spec is _flat_specs.get(len(flat_p)):  # primals a flat tuple of tensors
        args, targs = tuple(flat_p), tuple(cloned)
    else:
        args, targs = pytree.tree_unflatten(flat_p, spec), pytree.tree_unflatten(cloned, spec)
    try:
        with fsdp_hooks_on_duals():
            raw, traw = _run_with_duals(func, args, {}, targs, {}, dual_mode)
    except RuntimeError as e:
        if "resize_() on an invalid python storage" in str(e):
            raise RuntimeError(
                "torch_fwd: the function resized the storage of a tensor made while it ran, as FSDP2's "
                "fully_shard does to free and regather its parameters, outside the FSDP2 forward hooks that "
                "torch_fwd knows how to run; the eager path's tensors hold their values in a wrapper without "
                "storage of its own.") from e
        raise
    res, aux = _split_aux(raw, has_aux)
    tres = traw[0] if has_aux else traw
    flat_t = [tres] if type(res) is torch.Tensor else pytree.tree_leaves(tres, is_leaf=lambda x: x is None)
    return res, _collect(res, lambda i, o: flat_t[i], chunk), aux


# ---------------------------------------------------------------------------------------
# jacfwd
# ---------------------------------------------------------------------------------------

#: Bytes of tangent storage jacfwd aims for when chunk_size=None: K is chosen so that
#: K * itemsize * (inputs + outputs) * 2 stays within it (2: the basis and the output
#: tangents each once more for intermediates; measured on the 6400-input MLP of
#: benchmarks/jacobian.py, 64 MiB gives K = 640 and a 64 MiB peak).
JACFWD_MEMORY_BUDGET = 64 * 2 ** 20


def pick_chunk_size(n_inputs: int, n_outputs: int, itemsize: int, budget: int | None = None) -> int:
    """ForwardDiff's pickchunksize under a memory budget: the fewest chunks, then the
    smallest remainder (chunks of equal size)."""
    budget = JACFWD_MEMORY_BUDGET if budget is None else budget
    per_direction = max(1, itemsize * (n_inputs + n_outputs) * 2)
    k_max = max(1, min(n_inputs, budget // per_direction))
    n_chunks = math.ceil(n_inputs / k_max)
    return math.ceil(n_inputs / n_chunks)


def jacfwd(func, argnums=0, *, has_aux=False, chunk_size=None, path="auto"):
    """Jacobian of ``func`` by forward mode, ``chunk_size`` columns per pass.

    Like ``torch.func.jacfwd``: for an output of shape O and an input of shape I the block
    has shape (*O, *I); a tuple ``argnums`` gives a tuple of blocks per output.
    ``chunk_size=None`` picks K with :func:`pick_chunk_size`. Peak memory grows with K.
    """
    if not callable(func):
        raise TypeError(f"jacfwd: func must be callable, got {type(func).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"jacfwd: chunk_size must be a positive int or None, got {chunk_size!r}")
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)
    if not nums or not all(isinstance(n, int) for n in nums):
        raise TypeError(f"jacfwd: argnums must be an int or a tuple of ints, got {argnums!r}")

    def jac(*args):
        for n in nums:
            if not -len(args) <= n < len(args):
                raise ValueError(f"jacfwd: argnums {n} is out of range for {len(args)} positional arguments")
        idx = [n % len(args) for n in nums]
        diff = [args[i] for i in idx]
        flat_in, in_spec = pytree.tree_flatten(diff)
        for j, x in enumerate(flat_in):
            if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()):
                raise TypeError(f"jacfwd: differentiated input leaf {j} must be a floating tensor, got "
                                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")

        def g(*flat):
            full = list(args)
            for i, v in zip(idx, pytree.tree_unflatten(list(flat), in_spec)):
                full[i] = v
            return func(*full)

        sizes = [x.numel() for x in flat_in]
        n = sum(sizes)
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        k = chunk_size
        columns = None
        aux = None
        zeros = None
        start = 0
        while start < n:
            if k is None:
                # one K = 1 pass tells the output size for the budget
                kk = 1
            else:
                kk = min(k, n - start)
            if zeros is None or zeros[0].shape[0] < kk:
                # one zero block per input, reused by every chunk: its ones are set before a
                # pass and cleared after it (a fresh (K, n) block per chunk is a memset, and
                # with large blocks mmapped, page faults, for every chunk)
                zeros = [x.new_zeros((kk, sz)) for x, sz in zip(flat_in, sizes)]
            basis, ones = [], []
            for x, off, sz, z in zip(flat_in, offsets, sizes, zeros):
                v = z[:kk]
                lo, hi = max(start, off), min(start + kk, off + sz)
                if lo < hi:
                    at = (torch.arange(lo - start, hi - start, device=x.device),
                          torch.arange(lo - off, hi - off, device=x.device))
                    v[at] = 1
                    ones.append((v, at))
                basis.append(v.reshape((kk,) + tuple(x.shape)))
            res = jvp(g, tuple(flat_in), tuple(basis), has_aux=has_aux, chunked=True, path=path)
            out, tout = res[0], res[1]
            if has_aux and aux is None:
                aux = res[2]
            flat_out, out_spec = pytree.tree_flatten(out)
            flat_tout = pytree.tree_leaves(tout)
            if columns is None:
                columns = [o.new_empty((o.numel(), n)) for o in flat_out]
            for col, t in zip(columns, flat_tout):
                col[:, start:start + kk] = t.reshape(kk, -1).T
            # (only now: a tangent out may be a view of the basis, e.g. for an identity)
            for v, at in ones:
                v[at] = 0
            start += kk
            if k is None:
                itemsize = flat_in[0].element_size()
                k = pick_chunk_size(n, sum(o.numel() for o in flat_out), itemsize)
        if columns is None:  # no input elements: an empty Jacobian, func run once
            out, aux = _split_aux(func(*args), has_aux)
            flat_out, out_spec = pytree.tree_flatten(out)
            columns = [o.new_empty((o.numel(), 0)) for o in flat_out]
        blocks = []
        for o, col in zip(flat_out, columns):
            per_in = [col[:, off:off + sz].reshape(tuple(o.shape) + tuple(x.shape))
                      for x, off, sz in zip(flat_in, offsets, sizes)]
            per_in = pytree.tree_unflatten(per_in, in_spec)
            blocks.append(per_in[0] if single else tuple(per_in))
        result = pytree.tree_unflatten(blocks, out_spec)
        return (result, aux) if has_aux else result
    return jac


# ---------------------------------------------------------------------------------------
# make_jvp_graph
# ---------------------------------------------------------------------------------------

def make_jvp_graph(func, *primals, chunk=1, for_autograd=True):
    """The JVP of ``func`` as a readable ATen ``fx.GraphModule``.

    Captured with make_fx on fake tensors (functionalized), then rewritten by the
    forward-mode pass. Its inputs are the flattened primals, then one tangent of shape
    (chunk, *primal.shape) per floating primal; its outputs the flattened outputs, then one
    tangent per output (zeros where the output does not depend on the inputs).
    The graph is specialised on the primals' shapes, dtypes and any Python values
    ``func`` reads: ``jvp`` guards its own cache, a GraphModule you keep does not.
    ``for_autograd=False`` lets rules reuse what autograd cannot differentiate (statistics
    saved by an op, the fused kernels): faster, but back-propagating through the graph's
    tangents would then be wrong.
    """
    if not callable(func):
        raise TypeError(f"make_jvp_graph: func must be callable, got {type(func).__name__}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"make_jvp_graph: chunk must be a positive int, got {chunk!r}")
    flat_p, spec = pytree.tree_flatten(primals)
    for i, p in enumerate(flat_p):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"make_jvp_graph: primal leaf {i} is a {type(p).__name__}; primals must be tensors")

    def flat_fn(*flat):
        out = func(*pytree.tree_unflatten(list(flat), spec))
        return tuple(pytree.tree_leaves(out))

    aten_gm = to_aten(flat_fn, flat_p)
    active = [p.is_floating_point() or p.is_complex() for p in flat_p]
    with building_for_autograd(for_autograd):
        jg = build_jvp_graph(aten_gm, flat_p, active, chunk, zeros_for_inactive=True)
    gm = jg.gm
    names = [f"primal_{i}" for i in range(len(flat_p))] + [f"tangent_{i}" for i, a in enumerate(active) if a]
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], names):
        node._rename(name)
        node.target = name
    gm.recompile()
    return gm

