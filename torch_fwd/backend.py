"""The torch.compile backend ``"torch_fwd"``: tangents compiled inside the graph.

``torch.compile(f, backend="torch_fwd")`` (registered through the ``torch_dynamo_backends``
entry point in setup.py, so no import of torch_fwd is needed first) works as follows.

- A graph dynamo captured on ordinary tensors is compiled by Inductor, exactly as the
  default backend would (``torch._inductor.compile_fx.compile_fx``).
- A graph whose inputs include ``Dual``s (the function was called on Duals, by
  ``torch_fwd.jvp(..., compile=True)``, ``torch_fwd.JVP(module, compile=True)`` or by a user)
  is lowered to ATen (``capture.to_aten``), rewritten by the forward-mode pass (the shared
  rule table, ``transform.build_jvp_graph``) and that JVP graph is compiled by Inductor: one
  compiled graph computes the primal and all K tangents. Dynamo sees a Dual as a traceable
  wrapper subclass (``__tensor_flatten__``), so its guards cover tangent presence, K,
  shapes, strides and dtypes: a change recompiles.
- Between graph breaks the Python code runs on the Duals, through the eager path's rules.
- A region whose JVP graph cannot be built or compiled runs on its Duals through the eager
  path instead (never without its tangents); ``torch_fwd.explain()`` and the ``torch_fwd``
  logger say so.

Inductor settings for JVP graphs (``JVP_INDUCTOR_SETTINGS``): a JVP graph reuses each
intermediate value several times (the primal op, then every rule that reads it). Inductor
inlines a pointwise value into each reader until its op count passes
``realize_opcount_threshold``; on a 100-op chain with reuse (Mooncake's large_single_block)
the inlined expressions grow with every op and compiling takes minutes. Realising any
buffer read more than once after a few ops keeps the kernels' expressions short; the
memory traffic this adds is the values the JVP needs anyway. "A few" is 16 ops (Inductor's
default 30): at 8, a value such as kron's tangent (two products and a sum, 8 ops) was
written out before its reduction read it back (kron_sum 290 -> 220 us per call at 16,
broadcast_sin_cos_exp 110 -> 75, map_sin_cos_exp 330 -> 265, large_single_block 172 -> 157,
its compile 9 -> 10.5 s; at 30 that compile takes 28 s for no faster kernel).

A JVP graph also has about three nodes per primal op, so Inductor's default cap of 64
nodes per fused kernel (``max_fusion_size``) cuts its kernels about three times as often
as the primal's; 1024 lets the realised buffers above fuse into fewer loops (on these CPUs:
large_single_block's compiled JVP 330 -> 240 us per call, map_sin_cos_exp's 500 -> 330 us,
gp_lml's 1.9 -> 1.4 ms, compile times unchanged).

To find what to fuse, Inductor groups the nodes by the buffers they read or write and
tries each node against the next ``max_fusion_buffer_group_pairwise_attempts`` (64) of its
group, every fusion round. A JVP graph's groups are about three times the primal's (each
input is read by its primal ops and by the rules of each), so a long graph spends
quadratically more on those tries: map_sin_cos_exp, whose 300 realised buffers all read
the one input, made 26,000 fusion checks against the primal's 8,600, 2-3 s of its
compile. 16 keeps the tries within a rule's neighbourhood, where a JVP graph's fusions
are (the rules place a tangent beside its primal): the fusion step went from 2.0-2.8 to
0.8-0.9 s there (A/B in one process), and the eleven suite cases compared (the four
models, gp_lml, kron_view_sum, both maps, _sum_1000, _sum_sin_1000, large_single_block)
compile to as many kernels as at 64; the other six are graphs whose groups are shorter
than 16.

Inductor's ``reorder_for_locality`` pass moves each pointwise or reduction node up to its
inputs' producers. In a JVP graph the rules place a tangent's extern calls (matmuls,
solves) beside the primal's, so the pass splits what the rules put together: the softmax
of attention's scores moved above the product that gives its tangent, and the scores'
reductions and their tangent's could no longer share a kernel. Without it the transformer
block's JVP compiles 7 C++ kernels instead of 10 (each is one g++ run, ~1 s on these CPUs:
compile time is mostly kernel count), GPT-2's 10 instead of 11, at the same run time in
A/Bs in one process over the suite's cases.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import threading

import torch

from . import registry, triton_kernels
from .dual import Dual, current_level, hide_dispatch_from_dynamo, innermost_level
from .engine import building_for_autograd
from .transform import build_jvp_graph, unbatched_tangents

__all__ = ["torch_fwd_backend", "graph_regions_backend", "JVP_INDUCTOR_SETTINGS", "compiled_regions", "stats", "deferred_full_collections"]

log = logging.getLogger("torch_fwd")

#: Inductor config patches applied when compiling a JVP graph (see the module docstring;
#: measured in tests/test_backend.py's long-chain test and benchmarks/suite.py's compile column).
JVP_INDUCTOR_SETTINGS = {
    "realize_opcount_threshold": 16,
    "realize_cpu_opcount_threshold": 16,
    "realize_reads_threshold": 2,
    "max_fusion_size": 1024,
    "max_fusion_buffer_group_pairwise_attempts": 16,
    "reorder_for_locality": False,
}


#: Process-wide counts: JVP graphs compiled by Inductor (and of those, how many directly:
#: build_compiled_jvp_graph), regions that fell back to eager.
stats = {"jvp_graphs_compiled": 0, "jvp_graphs_compiled_directly": 0, "eager_fallbacks": 0}


class _Regions(threading.local):
    """What the compiled regions of the calling thread did, for explain()."""

    def __init__(self):
        self.compiled = 0
        self.eager: list[str] = []


_regions = _Regions()


def compiled_regions():
    """(number of regions run by their JVP graphs, [why each eager region ran eagerly]) since the
    last reset_regions() on this thread."""
    return _regions.compiled, list(_regions.eager)


def reset_regions():
    _regions.compiled = 0
    _regions.eager = []


class _QuietDynamo(logging.Filter):
    """While the calling thread runs a function region by region for jvp's path="auto"
    (``quiet_dynamo``), the warnings dynamo logs about a frame it could not compile (it
    then runs the frame uncompiled, on its Duals: the result is right) are not printed but
    kept, first lines only, for explain(). Other threads' records pass untouched."""

    def filter(self, record):
        if not getattr(_regions, "quiet", False) or record.levelno < logging.WARNING:
            return True
        msg = record.getMessage()
        if msg.startswith("WON'T CONVERT"):  # (a frame run uncompiled; the rest are details of it)
            why = f"{record.exc_info[0].__name__}: {record.exc_info[1]}" if record.exc_info else msg
            _regions.eager.append(" ".join(f"{msg.splitlines()[0]} ({why.splitlines()[0][:200]})".split()))
        return False


_quiet = _QuietDynamo()
for _name in ("torch._dynamo.convert_frame", "torch._guards", "torch._dynamo.variables.tensor"):
    logging.getLogger(_name).addFilter(_quiet)  # (inert outside quiet_dynamo)


@contextlib.contextmanager
def quiet_dynamo():
    _regions.quiet = True
    try:
        yield
    finally:
        _regions.quiet = False


def jvp_inductor_settings():
    """JVP_INDUCTOR_SETTINGS restricted to the options this Inductor has (a patch naming
    an unknown option fails, and every JVP region would then run eagerly)."""
    import torch._inductor.config as inductor_config
    return {k: v for k, v in JVP_INDUCTOR_SETTINGS.items() if hasattr(inductor_config, k)}


def _config_patches(mode, options):
    patches = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options
        patches.update(list_mode_options(mode))
    if options:
        patches.update(options)
    return patches


def jvp_patches(mode=None, options=None):
    """(key, Inductor config patches) for JVP graphs: our settings, then torch.compile's
    ``mode`` and ``options``. (jvp(compile=True) asks for the defaults on every call: made
    once.)"""
    default = mode is None and not options
    if default and _default_patches:
        return _default_patches[0]
    patches = {**jvp_inductor_settings(), **_config_patches(mode, options)}
    out = repr(sorted(patches.items())), patches
    if default:
        _default_patches.append(out)
    return out


_default_patches: list = []


def torch_fwd_backend(gm: torch.fx.GraphModule, example_inputs, mode=None, options=None):
    """The dynamo backend (see the module docstring). ``mode`` and ``options`` are
    torch.compile's, passed on to Inductor."""
    from torch._inductor.compile_fx import compile_fx
    hide_dispatch_from_dynamo()
    patches = _config_patches(mode, options)
    if not any(isinstance(x, Dual) for x in example_inputs):
        return _tracked(compile_fx(gm, example_inputs, config_patches=patches))
    return _tangent_graph(gm, jvp_patches(mode, options)[1])


def _tangent_graph(gm, patches):
    """A region called on Duals: its _TangentGraph, unless the region holds an
    autograd.Function with a jvp of the user's, which dynamo inlined, losing the jvp: that
    frame then runs eagerly, where Function.apply reaches the jvp."""
    from .rules.custom import refuse_user_jvp_functions
    name = refuse_user_jvp_functions(gm)
    if name is not None:
        from torch._dynamo.exc import SkipFrame
        _regions.eager.append(f"autograd.Function {name} defines jvp, which dynamo would inline past")
        raise SkipFrame(f"torch_fwd: autograd.Function {name} defines jvp; its frame runs eagerly")
    return _TangentGraph(gm, patches)


def graph_regions_backend(gm: torch.fx.GraphModule, example_inputs):
    """The backend of ``jvp``'s path="auto" for a function dynamo cannot capture whole:
    each region between graph breaks gets its JVP graph, run by the graph path's own
    runner (bindings, then a TorchScript trace once reused) as the graph path runs a whole
    function; nothing is compiled by Inductor. A region without Duals among its inputs
    runs as dynamo captured it. A region whose JVP graph cannot be built runs on its
    Duals through the eager path, as in torch_fwd_backend."""
    hide_dispatch_from_dynamo()
    if not any(isinstance(x, Dual) for x in example_inputs):
        return _tracked(gm.forward)
    return _tangent_graph(gm, None)


def _tracked(run):
    """A region without Duals among its inputs, run inside a jvp: its floating outputs
    become Duals (of the innermost level, without tangents), as the eager path's mode
    makes every tensor the function creates, so that a value with a tangent written into
    one of them after a graph break (``buf = torch.zeros(n)``, a break, ``buf[0] = y``) is
    tracked. Outside any jvp (a plain torch.compile with this backend) nothing changes."""
    def tracked(*args):
        out = run(*args)
        level = current_level()
        if level == 0:
            return out
        return [Dual(o, None, level=level) if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())
                and not isinstance(o, Dual) else o for o in out]
    return tracked


class _DeferredFullCollections:
    """While one or more JVP graphs are built and compiled (any thread), CPython's full
    (generation 2) collections wait: see ``deferred_full_collections``."""

    HELD_THRESHOLD = 1 << 30

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = None

    @contextlib.contextmanager
    def __call__(self):
        with self.lock:
            if self.depth == 0:
                self.saved = gc.get_threshold()
                if self.saved[0]:  # (a threshold of 0 turns collection off: left as it is)
                    gc.set_threshold(self.saved[0], self.saved[1], self.HELD_THRESHOLD)
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    gc.set_threshold(*self.saved)


#: Building and compiling a JVP graph creates many long-lived objects (fx nodes, fake
#: tensors, Inductor's IR and sympy expressions), and with CPython's default
#: thresholds every tenth generation-1 collection walks all of them again while they are
#: still being made: the collector took 1.2 s of map_sin_cos_exp's JVP compile and 3.6 s
#: of _sum_sin_1000's (0.75 s and 1.5 s of their primals'). Raising the generation-2
#: threshold while we build and compile defers those walks to the first collection after
#: (the counters are past the restored threshold by then); the younger generations and
#: reference counting free garbage as before. _sum_sin_1000's JVP compile: 26.6 -> 21.7 s
#: (medians of three, one process). PyTorch proposes the same for dynamo's own compiles
#: (pytorch/pytorch#193289); torch 2.13 does not have it, so the primal's compile still
#: pays the walks. The threshold is process-wide: a thread compiling beside ours shares
#: the deferral, and the threshold saved by the first one in is restored when the last one
#: leaves.
deferred_full_collections = _DeferredFullCollections()


def build_compiled_jvp_graph(lower, args, tangents, active, chunk, patches, grad, unbatched=False):
    """The JVP graph of the ATen graph ``lower()`` gives (capture.to_aten, called here so
    that the lowering, the forward-mode pass and Inductor all run with full collections
    deferred: ``deferred_full_collections``) as a transform.JVPGraph, its GraphModule
    compiled by Inductor for these inputs (``tangents``: one per input, None where
    inactive); the caller's guards keep them valid. ``grad``: whether autograd will
    differentiate it. ``unbatched``: one direction, its tangents without the leading K = 1
    (see ``transform.unbatched_tangents``).

    Where autograd will not (the common case) and no option asks for what only
    ``compile_fx`` arranges (CUDA graphs, the C++ wrapper, freezing), the graph goes to
    Inductor directly: the forward-mode pass's make_fx applies Inductor's decompositions
    (``select_decomp_table``) while it records, and the graph, functional already, is
    handed to ``compile_fx_forward``, the step ``compile_fx`` reaches after aot_autograd has
    re-traced a graph to functionalize and decompose it. That re-trace is a quarter of a
    long graph's compile (``_sum_1000``: 6.5 of 31 s), and its runtime wrapper 5 us of
    every call. Anything else, or a graph the direct step fails on (logged), goes through
    ``compile_fx``.

    Rules trace with ``triton_kernels.for_inductor``: Inductor writes the elementwise and
    row-wise tangents' kernels itself, fused with their neighbours."""
    with deferred_full_collections():
        return _build_compiled_jvp_graph(lower(), args, tangents, active, chunk, patches, grad, unbatched)


def _build_compiled_jvp_graph(aten_gm, args, tangents, active, chunk, patches, grad, unbatched):
    if not grad and _direct_ok(patches):
        from torch._inductor.decomposition import select_decomp_table
        with triton_kernels.for_inductor():
            jg = build_jvp_graph(aten_gm, args, active, chunk, decompositions=select_decomp_table())
        try:
            return _compile(jg, args, tangents, patches, direct=True, unbatched=unbatched)
        except Exception as e:  # noqa: BLE001 - compile_fx below reports what is real
            # (once per distinct failure: on a torch whose compile_fx_forward differs from the
            # one this was written against, 2.11's say, every graph fails the same way)
            why = f"{type(e).__name__}: {e}"
            level = logging.DEBUG if why in _direct_failures_seen else logging.WARNING
            _direct_failures_seen.add(why)
            log.log(level, "torch_fwd backend: Inductor's direct compile failed (%s); compiling through "
                    "compile_fx", why)
    with triton_kernels.for_inductor():
        jg = build_jvp_graph(aten_gm, args, active, chunk)
    return _compile(jg, args, tangents, patches, direct=False, unbatched=unbatched)


_direct_failures_seen: set = set()


def _direct_ok(patches) -> bool:
    import torch._inductor.config as inductor_config
    with inductor_config.patch(patches):
        return not (inductor_config.triton.cudagraphs or inductor_config.cpp_wrapper or inductor_config.freezing)


def inductor_directly(gm, examples, patches):
    """A functional, decomposed inference graph compiled as compile_fx compiles the graph
    aot_autograd hands it (``compile_fx_forward``: the joint-graph passes, output strides,
    ``compile_fx_inner``)."""
    import torch._inductor.compile_fx as cfx
    import torch._inductor.config as inductor_config
    with inductor_config.patch(patches):
        compiled = cfx.compile_fx_forward(
            gm, examples, num_orig_model_outputs=cfx.get_num_model_outputs(gm),
            num_example_inputs=len(examples), compiler_config_extra=cfx.create_compiler_config_extra(gm),
            inner_compile=cfx.compile_fx_inner, is_inference=True)

    # CompiledFxGraph.__call__ ends the autotune-cache bundling its first call starts and
    # labels the call for the profiler: after that call, and without a profiler, its
    # current_callable (the generated module's call, realigning inputs where needed) is
    # what it would run, less ~3 us
    first = [True]

    def run(*a):
        if first[0] or torch.autograd.profiler._is_profiler_enabled:
            first[0] = False
            return compiled(list(a))  # (Inductor's boxed convention: it may empty the list)
        return compiled.current_callable(list(a))
    return run


def _compile(jg, args, tangents, patches, direct, unbatched):
    """``aten.view`` nodes whose result is not written to become ``aten.reshape`` first:
    make_fx recorded them for the strides eager kernels gave their inputs, and Inductor's
    decompositions may lay an intermediate out differently (a view of an expanded,
    transposed attention tensor then fails to trace); reshape is the same view wherever
    one exists. ``unbatched``: the graph is first given one direction's tangents without
    their K (``unbatched_tangents``)."""
    import dataclasses
    import torch._inductor.compile_fx as cfx
    aten = torch.ops.aten
    if unbatched:
        jg = unbatched_tangents(jg)
    gm = jg.gm
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.view.default and not any(
                isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable for u in n.users):
            n.target = aten.reshape.default
    gm.recompile()
    examples = list(args) + [t for t, a in zip(tangents, jg.active_inputs) if a]
    with torch._C.DisableTorchFunction():  # (as in to_aten: a user's mode is in the graph already)
        if direct:
            fn = inductor_directly(gm, examples, patches)
            stats["jvp_graphs_compiled_directly"] += 1
        else:
            fn = cfx.compile_fx(gm, examples, config_patches=patches)
    stats["jvp_graphs_compiled"] += 1
    return dataclasses.replace(jg, gm=fn)


class _TangentGraph:
    """One captured graph called on Duals: its JVP graph, compiled by Inductor with
    ``patches`` (None: not compiled, graph_regions_backend), per (tangent pattern, K,
    rule-table generation, grad mode, input layout)."""

    def __init__(self, gm, patches):
        self.gm = gm
        self.patches = patches
        self.compiled: dict = {}
        self.lock = threading.Lock()

    def __call__(self, *args):
        level = innermost_level(args)
        prims, tans, chunk = [], [], None
        layout, requires_grad, nested = [], False, False
        for a in args:  # (one pass: this runs once per region call)
            if type(a) is Dual and a._level == level:
                p = a.primal
                t = a.tangent
                if chunk is None:
                    chunk = a._chunk
                if t is not None:
                    requires_grad = requires_grad or t.requires_grad
            else:
                p, t = a, None
            if isinstance(p, torch.Tensor):
                nested = nested or isinstance(p, Dual)
                requires_grad = requires_grad or p.requires_grad
                layout.append((p.shape, p.stride(), p.dtype, t is not None))
            else:
                layout.append((p, t is not None))
            prims.append(p)
            tans.append(t)
        if chunk is None or nested:
            # no tangent at all (K unknown), or Duals of an enclosing level (a nested jvp):
            # the eager path differentiates at every level
            return self._eager(args, "no input carries a tangent" if chunk is None
                               else "Duals of two levels (a nested jvp)")
        grad = requires_grad and torch.is_grad_enabled()
        key = (chunk, registry.generation(), grad, tuple(layout))
        entry = self.compiled.get(key)
        if entry is None:
            with self.lock:
                entry = self.compiled.get(key)
                if entry is None:
                    active = tuple(t is not None for t in tans)
                    entry = self.compiled[key] = self._compile(prims, tans, active, chunk, grad)
        if isinstance(entry, str):
            return self._eager(args, entry)
        outs, touts, mutated = entry(prims, [t.contiguous() if t is not None else None for t in tans])
        outs = [self._wrap(o, t, chunk, level) for o, t in zip(outs, touts)]
        for i, t in mutated.items():
            if isinstance(args[i], Dual) and args[i]._level == level:
                args[i].ensure_tangent(chunk).copy_(t)
        _regions.compiled += 1
        return outs

    def _compile(self, prims, tans, active, chunk, grad):
        from .capture import to_aten
        try:
            with building_for_autograd(grad):
                if self.patches is None:  # (graph_regions_backend: the graph path's runner)
                    jg = build_jvp_graph(to_aten(self.gm, prims), prims, active, chunk)
                    jg.trace_when_reused = not grad
                    return jg
                return build_compiled_jvp_graph(lambda: to_aten(self.gm, prims), prims,
                                                [t.contiguous() if t is not None else None for t in tans],
                                                active, chunk, self.patches, grad)
        except Exception as e:  # noqa: BLE001 - the eager path runs the region and reports real errors
            why = f"{type(e).__name__}: {e}".strip()
            log.warning("torch_fwd backend: a region runs through the eager path: %s", why)
            stats["eager_fallbacks"] += 1
            return why

    def _eager(self, args, why):
        _regions.eager.append(why)
        return self.gm(*args)

    @staticmethod
    def _wrap(o, t, chunk, level):
        # (an output aliasing an input -- which dynamo mostly re-creates from the input in
        # its bytecode, on the Dual -- comes from Inductor as a view of the input, and its
        # tangent as the same view of the input's tangent: tangents are passed uncopied
        # when contiguous)
        if not isinstance(o, torch.Tensor) or not (o.is_floating_point() or o.is_complex()):
            return o
        if isinstance(o, Dual):
            return Dual(o, t, chunk=chunk, level=level)
        return Dual._checked_by_caller(o, t, chunk, level)
