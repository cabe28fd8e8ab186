"""check_frule: test a rule (or any function) against float64 finite differences and
torch.func.jvp, in the eager and the graph path, with K = 1 and K > 1, zero and non-zero
tangents. Public: users check their own rules with it."""
from __future__ import annotations

import warnings

import torch
import torch.utils._pytree as pytree

__all__ = ["check_frule", "finite_difference_jvp", "OracleNotApplicable"]

_STEPS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def _as_fn(op_or_fn):
    if isinstance(op_or_fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return lambda *a: op_or_fn(*a)
    return op_or_fn


def finite_difference_jvp(fn, primals, tangent, step, seed=0):
    """Central difference of fn at primals along one tangent (tuple, same structure), in
    float64; the RNG is reseeded before each evaluation so random ops draw alike."""
    def shifted(s):
        args = tuple(p + s * t if isinstance(p, torch.Tensor) and t is not None else p
                     for p, t in zip(primals, tangent))
        torch.manual_seed(seed)
        return pytree.tree_leaves(fn(*args))
    plus, minus = shifted(step), shifted(-step)
    return [(a - b) / (2 * step) if isinstance(a, torch.Tensor) and a.is_floating_point() else None
            for a, b in zip(plus, minus)]


def _close(a, b, atol, rtol):
    return torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True)


def check_frule(op_or_fn, *args, argnums=None, chunk=(1, 3), paths=("eager", "graph"), atol=1e-6, rtol=1e-5,
                check_torch_func=True, seed=0):
    """Check torch_fwd's JVP of ``op_or_fn(*args)``.

    ``args`` should be float64 for the finite-difference oracle. ``argnums`` selects the
    arguments that get tangents (default: every floating tensor argument). For each path
    and each K in ``chunk``, the JVP along K random directions is compared per direction
    with central finite differences (passing if one step of a ladder agrees) and with
    ``torch.func.jvp`` (where it works); a zero tangent must give a zero output tangent.
    Raises AssertionError naming what disagreed. Returns the number of comparisons made.
    """
    from . import api
    fn = _as_fn(op_or_fn)
    args = tuple(args)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    argnums = tuple(argnums)

    def g(*diff):
        full = list(args)
        for i, d in zip(argnums, diff):
            full[i] = d
        return fn(*full)

    primals = tuple(args[i] for i in argnums)
    gen = torch.Generator().manual_seed(seed)
    n_checks = 0
    originals = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    oracle_blind = None  # why torch.func.jvp does not apply to this function, once found
    for path in paths:
        for k in chunk:
            tangents = tuple(torch.randn((k,) + tuple(p.shape), generator=gen, dtype=p.dtype) for p in primals)
            tangent_copies = [t.clone() for t in tangents]
            torch.manual_seed(seed)
            out, tout = api.jvp(g, primals, tangents, chunked=True, path=path)
            for t, c in zip(tangents, tangent_copies):
                assert torch.equal(t, c), f"{path}: the caller's tangent was modified"
            flat_out = pytree.tree_leaves(out)
            flat_tout = pytree.tree_leaves(tout)
            # primal output must match the function's own, drawing the same random numbers
            torch.manual_seed(seed)
            ref = pytree.tree_leaves(g(*primals))
            for i, (o, r) in enumerate(zip(flat_out, ref)):
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    assert _close(o, r, atol, rtol), f"{path}, K={k}: primal output {i} differs from func's"
            for c in range(k):
                direction = tuple(t[c] for t in tangents)
                ours = [t[c] for t in flat_tout]
                fd = _check_against_fd(g, primals, direction, ours, atol, rtol, seed, f"{path}, K={k}, direction {c}")
                n_checks += 1
                if check_torch_func and not oracle_blind:
                    oracle_blind = _check_against_torch_func(g, primals, direction, ours, fd, atol, rtol, seed,
                                                             f"{path}, K={k}, direction {c}")
            # zero tangents in, zero tangents out
            zeros = tuple(torch.zeros_like(t) for t in tangents)
            _, tz = api.jvp(g, primals, zeros, chunked=True, path=path)
            for i, t in enumerate(pytree.tree_leaves(tz)):
                if t.is_floating_point():
                    assert torch.count_nonzero(torch.nan_to_num(t)) == 0, f"{path}, K={k}: zero tangent gave non-zero output {i}"
            if path == "graph":
                # a cached graph runs differently from its second call on (a TorchScript
                # trace where one can be trusted, torch_fwd/scripted.py): the third call
                # must give the first one's answer
                torch.manual_seed(seed)
                _, again = api.jvp(g, primals, tangents, chunked=True, path=path)
                for i, (a, b) in enumerate(zip(pytree.tree_leaves(again), flat_tout)):
                    if isinstance(b, torch.Tensor) and b.is_floating_point():
                        assert _close(a, b, atol, rtol), f"graph, K={k}: a repeated call changed output tangent {i}"
    for a, o in zip(args, originals):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, o) or a.is_floating_point() and torch.allclose(a, o, equal_nan=True), \
                "the caller's inputs were modified"
    if oracle_blind:
        warnings.warn(f"check_frule: torch.func.jvp was not used as an oracle: {oracle_blind}; finite differences "
                      f"alone checked the rule", OracleNotApplicable, stacklevel=2)
    return n_checks


class OracleNotApplicable(UserWarning):
    """check_frule found that torch.func.jvp cannot serve as an oracle for the function."""


def _check_against_fd(g, primals, direction, ours, atol, rtol, seed, where):
    """The finite differences that agree with ``ours`` (one step of the ladder), else
    AssertionError."""
    best = None
    for step in _STEPS:
        fd = finite_difference_jvp(g, primals, direction, step, seed=seed)
        ok = True
        for i, (a, b) in enumerate(zip(ours, fd)):
            if b is None:
                continue
            if not _close(a.to(b.dtype), b, max(atol, 1e-5), max(rtol, 1e-4)):  # FD noise floor
                ok = False
                err = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
                if best is None or err < best[0]:
                    best = (err, i, step)
                break
        if ok:
            return fd
    raise AssertionError(f"{where}: tangent of output {best[1]} disagrees with finite differences "
                         f"(max abs error {best[0]:.3g} at best step)")


def _check_against_torch_func(g, primals, direction, ours, fd, atol, rtol, seed, where):
    """Compare with torch.func.jvp; returns why it does not apply (None: it did): it raises,
    or it gives an exact zero where finite differences (which agreed with ours) do not,
    as it does through an opaque custom op it has no formula for."""
    try:
        torch.manual_seed(seed)
        _, ref = torch.func.jvp(g, primals, direction)
    except Exception:  # noqa: BLE001 - torch.func fails where we do not; FD is the oracle then
        return None
    for i, (a, b) in enumerate(zip(ours, pytree.tree_leaves(ref))):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            if not _close(a.to(b.dtype), b, atol, rtol) and torch.count_nonzero(b) == 0 and fd[i] is not None \
                    and not _close(fd[i], torch.zeros_like(fd[i]), max(atol, 1e-5), max(rtol, 1e-4)):
                return (f"it gives a zero tangent for output {i} where finite differences do not (an op it "
                        f"cannot differentiate, such as a custom op without a forward formula)")
            assert _close(a.to(b.dtype), b, atol, rtol), (
                f"{where}: tangent of output {i} disagrees with torch.func.jvp "
                f"(max abs error {(a - b).abs().max().item():.3g})")
