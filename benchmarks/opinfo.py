"""The OpInfo sweep: torch_fwd.jvp and torch.func.jvp on the samples of every entry of
PyTorch's own test database (``op_db``), each tangent checked against float64 central
finite differences. Shared by tests/test_opinfo.py and ``python -m benchmarks.coverage``.

An entry is checked on up to ``MAX_SAMPLES`` of its float64 CPU samples. Every floating
tensor in a sample (input, positional and keyword arguments, lists of tensors) gets a
tangent; integer and boolean tensors are held fixed. Per sample:

- torch.func.jvp along one direction: 'error' if it raises, 'wrong' if its tangent
  disagrees with finite differences, else 'pass';
- torch_fwd.jvp, eager path and graph path, K = 1 and K = 3 (the K = 1 direction is the
  first of the three): each direction against finite differences and, where torch.func
  passed, against torch.func; zero tangents must give zero output tangents; the caller's
  tensors must be untouched. The graph path refusing to capture (data-dependent code) is
  'no-graph', not a failure: ``jvp(path="auto")`` runs the eager path there.

The entry's status is its worst sample's. Finite differences take the best of a ladder of
steps; a random op is reseeded before every evaluation so that all oracles draw alike.
"""
from __future__ import annotations

import dataclasses
import functools
import traceback

import torch
import torch.utils._pytree as pytree

MAX_SAMPLES = 3
CHUNK = 3
FD_STEPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
FD_TOL = dict(atol=1e-5, rtol=1e-4)       # finite differences carry truncation and rounding error
FUNC_TOL = dict(atol=1e-6, rtol=1e-5)     # two exact forward-mode results
SEED = 0
# outputs that are uninitialised memory: no value to compare, so nothing is checked
UNDEFINED_OUTPUT = {"empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty", "empty_permuted"}
# Entries torch_fwd fails, each with why. The list only shrinks: tests/test_opinfo.py
# fails when a listed entry starts passing. "kink" entries are samples where the function
# is not differentiable (FD sees a jump); torch_fwd must still match torch.func.jvp there
# where that one runs. Every other entry is a loud error, never a silent wrong tangent.
NO_RULE = "no rule yet (NoRuleError names the op)"
EXPECTED_FAILURES = {
    "geqrf": f"{NO_RULE}: the Householder form (a, tau) of QR has no forward formula anywhere",
    "linalg.ldl_factor": f"{NO_RULE}: the Bunch-Kaufman LDL^T factors with pivoting",
    "linalg.ldl_factor_ex": f"{NO_RULE}: the Bunch-Kaufman LDL^T factors with pivoting",
    "linalg.ldl_solve": f"{NO_RULE}: solving with (packed) LDL^T factors",
    "unique": f"{NO_RULE}: the output's size depends on which values are equal",
    "unique_consecutive": f"{NO_RULE}: the output's size depends on which values are equal",
    "histogramdd": f"{NO_RULE}: _histogramdd_bin_edges / _histogramdd_from_bin_cts",
    "special.airy_ai": f"{NO_RULE}: Ai'(x) is not among torch.special's functions",
    "resize_": f"{NO_RULE}: resize changes a tensor's size and storage",
    "resize_as_": f"{NO_RULE}: resize_as changes a tensor's size and storage",
    "to_sparse": "sparse layouts are not supported (error)",
    "histogram": "kink: sample 2 puts x exactly on a bin edge, where the count jumps (FD sees the jump); the rule "
                 "returns 0 there, the derivative on either side (tests/test_edge_cases.py)",
    "nn.functional.cosine_embedding_loss": "kink: the float target holds labels +-1 that the loss compares for "
                                           "equality, so FD along the target jumps; as torch.func.jvp",
    "nn.functional.hinge_embedding_loss": "kink: the float target holds labels +-1 that the loss compares for "
                                          "equality, so FD along the target jumps; as torch.func.jvp",
    "linalg.pinv": "kink: sample 2 has rtol = 1.0 exactly at the largest singular value's ratio, where the "
                   "rank cut jumps; as torch.func.jvp",
}
_ORDER = {"skip": 0, "pass": 1, "no-graph": 2, "error": 3, "wrong": 4}


@dataclasses.dataclass
class Outcome:
    status: str            # 'pass', 'no-graph', 'error', 'wrong' or 'skip' (nothing floating to check)
    detail: str = ""

    def worse(self, other: "Outcome") -> "Outcome":
        return other if _ORDER[other.status] > _ORDER[self.status] else self


@dataclasses.dataclass
class EntryResult:
    name: str
    family: str
    samples: int
    ours: Outcome           # the worse of eager and graph ('no-graph': eager passed, capture refused)
    eager: Outcome
    graph: Outcome
    func: Outcome


@functools.lru_cache(maxsize=None)
def op_db():
    from torch.testing._internal.common_methods_invocations import op_db as db
    return tuple(db)


def entry_name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


@functools.lru_cache(maxsize=None)
def entries():
    """Every op_db entry with float64 CPU support, by name (names are unique)."""
    out = {}
    for op in op_db():
        if torch.float64 in op.supported_dtypes("cpu"):
            out[entry_name(op)] = op
    return out


_PREFIX_FAMILIES = (("nn.functional.", "nn.functional"), ("linalg.", "linalg"), ("special.", "special"),
                    ("fft.", "fft"), ("_refs.", "refs"), ("masked.", "masked"), ("sparse.", "sparse"))
_CLASS_FAMILIES = {"UnaryUfuncInfo": "unary elementwise", "BinaryUfuncInfo": "binary elementwise",
                   "ReductionOpInfo": "reductions", "ShapeFuncInfo": "shape and view"}


def family(op) -> str:
    """A coarse op family for the report: the namespace, else the kind of OpInfo entry."""
    for prefix, fam in _PREFIX_FAMILIES:
        if op.name.startswith(prefix):
            return fam
    return _CLASS_FAMILIES.get(type(op).__name__, "other")


# ---------------------------------------------------------------------------------------
# one sample
# ---------------------------------------------------------------------------------------

def samples(op, n=MAX_SAMPLES):
    torch.manual_seed(SEED)
    out = []
    for s in op.sample_inputs("cpu", torch.float64, requires_grad=False):
        out.append(s)
        if len(out) == n:
            break
    return out


def sample_function(op, sample):
    """(fn, primals): fn(*primals) evaluates the op on the sample, every floating tensor
    of the sample replaced by the corresponding primal."""
    leaves, spec = pytree.tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]

    def fn(*diff):
        full = list(leaves)
        for i, d in zip(slots, diff):
            full[i] = d
        inp, args, kwargs = pytree.tree_unflatten(full, spec)
        # OpInfo's own wrappers, as its gradient tests use them: e.g. eigh sees (A + A^H) / 2,
        # eig's eigenvectors are normalised (their phase is arbitrary)
        return sample.output_process_fn_grad(op.gradcheck_wrapper(op, inp, *args, **kwargs))
    return fn, tuple(leaves[i] for i in slots)


def _checked_leaves(out):
    return [o if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex()) else None
            for o in pytree.tree_leaves(out)]


def _call(fn, args):
    torch.manual_seed(SEED)
    return fn(*args)


def _shifted(p, d=None, step=0.0):
    """A fresh copy of p, plus step * d, with p's strides and storage offset (as_strided
    reads the storage). Every evaluation gets fresh copies: some ops write their inputs."""
    n = p.untyped_storage().nbytes() // p.element_size()
    if p.is_contiguous() and p.storage_offset() == 0 and n == p.numel():
        return p.clone() if d is None else p + step * d
    full = torch.as_strided(p, (n,), (1,), 0).clone()
    out = full.as_strided(p.shape, p.stride(), p.storage_offset())
    if d is not None:
        out.add_(step * d)
    return out


def _copies(primals):
    return tuple(_shifted(p) for p in primals)


def _fd(fn, primals, direction, step):
    plus = _checked_leaves(_call(fn, [_shifted(p, d, step) for p, d in zip(primals, direction)]))
    minus = _checked_leaves(_call(fn, [_shifted(p, d, -step) for p, d in zip(primals, direction)]))
    return [None if a is None else (_wide(a) - _wide(b)) / (2 * step) for a, b in zip(plus, minus)]


def _wide(x):
    return x.to(torch.complex128 if x.is_complex() else torch.float64)


def _tolerance(dtype, atol, rtol):
    """Looser for outputs rounded to a narrower type (x.half(), x.float()): the finite
    difference of a rounded output is only good to about sqrt(eps)."""
    if dtype in (torch.float64, torch.complex128):
        return atol, rtol
    tol = 10 * torch.finfo(dtype).eps ** 0.5
    return max(atol, tol), max(rtol, tol)


def _close(a, b, atol, rtol, primal=None):
    """a and b agree where the primal output is finite (a derivative at a NaN or an
    infinity is not defined: nothing is asserted there)."""
    if a.shape != b.shape:
        return False
    a, b = _wide(a), _wide(b)
    if primal is not None:
        atol, rtol = _tolerance(primal.dtype, atol, rtol)
        keep = torch.isfinite(primal)
        a, b = a[keep], b[keep]
    return torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True)


def _max_err(a, b):
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    d = (_wide(a) - _wide(b)).abs()
    d = d[~d.isnan()]
    return f"{d.max().item():.3g}" if d.numel() else "nan pattern"


class _FiniteDifferences:
    """The finite-difference ladder per direction, computed once and shared by all checks."""

    def __init__(self, fn, primals, outputs):
        self.fn, self.primals, self.outputs, self._cache = fn, primals, outputs, {}

    def agrees(self, key, direction, tangents):
        """None when ``tangents`` (per checked output leaf) agree with some step, else why not."""
        ladders = self._cache.setdefault(key, [])
        worst = None
        for i, step in enumerate(FD_STEPS):
            if i == len(ladders):
                ladders.append(_fd(self.fn, self.primals, direction, step))
            fd = ladders[i]
            bad = next((j for j, (a, b, o) in enumerate(zip(tangents, fd, self.outputs))
                        if b is not None and not _close(a, b, **FD_TOL, primal=o)), None)
            if bad is None:
                return None
            worst = worst or f"output {bad}: max error {_max_err(tangents[bad], fd[bad])} (step {step:g})"
        return f"disagrees with finite differences, {worst}"


def _directions(primals):
    gen = torch.Generator().manual_seed(SEED)
    return [tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in primals) for _ in range(CHUNK)]


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def check_torch_func(fn, primals, direction, fd):
    try:
        with torch.no_grad():
            torch.manual_seed(SEED)
            _, t = torch.func.jvp(fn, _copies(primals), direction)
    except Exception as e:  # noqa: BLE001 - a failure is what we record
        return Outcome("error", _short(e)), None
    flat = _checked_leaves(t)
    why = fd.agrees(0, direction, flat)
    return (Outcome("wrong", why) if why else Outcome("pass")), flat


def check_ours(fn, primals, directions, fd, path, func_tangent, func_ok):
    """torch_fwd.jvp on one sample along ``directions`` (K = 1 with the first, then all)."""
    import torch_fwd
    ref, after = fd.outputs, fd.inputs_after
    for k in (1, len(directions)):
        tangents = tuple(torch.stack([d[i] for d in directions[:k]]) for i in range(len(primals)))
        copies = [t.clone() for t in tangents]
        mine = _copies(primals)
        try:
            with torch.no_grad():
                torch.manual_seed(SEED)
                out, tout = torch_fwd.jvp(fn, mine, tangents, chunked=True, path=path)
        except RuntimeError as e:
            if path == "graph" and "could not be captured" in str(e):
                return Outcome("no-graph", _short(e))
            return Outcome("error", _short(e))
        except Exception as e:  # noqa: BLE001
            return Outcome("error", _short(e))
        if any(not torch.equal(t, c) for t, c in zip(tangents, copies)):
            return Outcome("wrong", "the caller's tangent was modified")
        for i, (m, a) in enumerate(zip(mine, after)):
            if not torch.allclose(m, a, equal_nan=True):
                return Outcome("wrong", f"primal {i} is left {'changed' if torch.equal(a, primals[i]) else 'other'}"
                                        " than the op itself leaves it")
        outs, touts = _checked_leaves(out), pytree.tree_leaves(tout)
        for i, (o, r) in enumerate(zip(outs, ref)):
            if r is not None and not (o.shape == r.shape and torch.allclose(_wide(o), _wide(r), atol=1e-10,
                                                                            rtol=1e-8, equal_nan=True)):
                return Outcome("wrong", f"K={k}: primal output {i} differs from the op's")
        for c in range(k):
            ours = [None if r is None else t[c] for t, r in zip(touts, ref)]
            as_func = c == 0 and func_tangent is not None and all(
                b is None or _close(a, b, **FUNC_TOL, primal=r) for a, b, r in zip(ours, func_tangent, ref))
            why = fd.agrees(c, directions[c], ours)
            if why:
                # at a kink both forward modes may agree with each other and not with FD
                return Outcome("wrong", f"K={k}, direction {c}: {why}"
                                        + ("; equal to torch.func.jvp's" if as_func else ""))
            if c == 0 and func_tangent is not None and func_ok and not as_func:
                bad = next(i for i, (a, b, r) in enumerate(zip(ours, func_tangent, ref))
                           if b is not None and not _close(a, b, **FUNC_TOL, primal=r))
                return Outcome("wrong", f"K={k}: output {bad} disagrees with torch.func.jvp "
                                        f"(max error {_max_err(ours[bad], func_tangent[bad])})")
        if k == 1:
            zeros = tuple(torch.zeros_like(t) for t in tangents)
            try:
                with torch.no_grad():
                    torch.manual_seed(SEED)
                    _, tz = torch_fwd.jvp(fn, _copies(primals), zeros, chunked=True, path=path)
            except Exception as e:  # noqa: BLE001
                return Outcome("error", f"zero tangents: {_short(e)}")
            for i, (t, r) in enumerate(zip(pytree.tree_leaves(tz), ref)):
                if r is not None and torch.count_nonzero(torch.nan_to_num(_wide(t)[:, torch.isfinite(r)])):
                    return Outcome("wrong", f"zero tangents gave a non-zero tangent of output {i}")
    return Outcome("pass")


def check_entry(name, paths=("eager", "graph"), max_samples=MAX_SAMPLES) -> EntryResult:
    op = entries()[name]
    eager = graph = func = Outcome("skip")
    n = 0
    for sample in samples(op, max_samples) if name not in UNDEFINED_OUTPUT else ():
        if any(isinstance(x, torch.Tensor) and x.layout != torch.strided
               for x in pytree.tree_leaves((sample.input, sample.args, sample.kwargs))):
            continue  # sparse tensors: outside what this sweep checks
        fn, primals = sample_function(op, sample)
        after = _copies(primals)
        try:
            ref = _checked_leaves(_call(fn, after))
        except Exception:  # noqa: BLE001 - a sample the op itself rejects checks nothing
            continue
        if not primals or all(r is None for r in ref):
            continue
        n += 1
        fd = _FiniteDifferences(fn, primals, ref)
        fd.inputs_after = after  # what the op leaves in its inputs (some write them)
        directions = _directions(primals)
        f_out = _guarded(check_torch_func, fn, primals, directions[0], fd)
        f_out, f_tangent = (f_out, None) if isinstance(f_out, Outcome) else f_out
        f_ok = f_out.status == "pass"
        func = func.worse(f_out)
        if "eager" in paths:
            eager = eager.worse(_guarded(check_ours, fn, primals, directions, fd, "eager", f_tangent, f_ok))
        if "graph" in paths:
            torch._dynamo.reset()  # one entry's recompiles never count against another's limit
            graph = graph.worse(_guarded(check_ours, fn, primals, directions, fd, "graph", f_tangent, f_ok))
    ours = eager.worse(graph)
    return EntryResult(name, family(op), n, ours, eager, graph, func)


def _guarded(check, *args):
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001 - a crash in the checker itself is an error, with its place
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome("error", f"{_short(e)} (at {tb.filename}:{tb.lineno})")
