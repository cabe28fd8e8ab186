"""Every library rule at second order, two ways, on each rule family's own TEST_CASES:

- nested: ``jvp`` of a function that calls ``jvp`` (the rule runs on Duals of the
  enclosing level, which differentiates it), against a central difference of the
  first-order JVP (itself checked against finite differences by test_rules.py);
- autograd: the graph path's output tangent back-propagated to the primals and the
  tangents (what forward-over-reverse HVPs and training through a JVP need), against a
  central difference along a random direction, and against linearity in the tangents.
"""
import pytest
import torch
import torch.utils._pytree as pytree

import torch_fwd
from torch_fwd import rules

CASES = [(fam.__name__.rsplit(".", 1)[-1], c) for fam in rules.FAMILIES for c in getattr(fam, "TEST_CASES", [])]
IDS = [f"{f}-{c.name}" for f, c in CASES]

_KINK = "the sample sits on a kink (a tie): the second derivative is not defined there"
_LIMIT = ("the first-order rule uses a constant limit at x = 0 or +-1 (a removable singularity); its "
          "derivative there is not the second derivative (second-order limits are not implemented)")
_NO_RULE = ("no rule or decomposition: the forward-AD fallback is refused on an enclosing level's Duals, so "
            "the second order is a loud NoRuleError")

# Cases whose nested second order is known not to match, each with why; strict xfail: a
# fix shows up as a failure to remove the entry.
NESTED_KNOWN = {
    "maximum_ties": _KINK, "minimum_ties": _KINK,
    "bessel_j1_at_zero": _LIMIT, "polynomials_at_singular_points": _LIMIT,
    "scatter_reduce_add": _NO_RULE,
    "scatter_reduce_multiply": _NO_RULE, "lu_factor_wide": _NO_RULE,
    "ctc_loss": "the rule calls _ctc_loss_backward, which has no rule: a loud NoRuleError at second order",
    "ctc_loss_mean_zero_infinity": "as ctc_loss",
}

_PT_NO_GRAD = "PyTorch has no derivative for an op the tangent uses (it raises, or marks the output non-differentiable)"
_PT_CONVENTION = ("PyTorch's own backward of the op disagrees with finite differences here (the same holds "
                  "for the primal): ")
AUTOGRAD_KNOWN = {
    "maximum_ties": _KINK, "minimum_ties": _KINK, "heaviside": _PT_NO_GRAD,
    **{name: _PT_NO_GRAD for name in (
        "zeta", "bessel_j_y", "bessel_j1_at_zero", "modified_bessel", "chebyshev",
        "chebyshev_tensor_degree", "polynomials_at_singular_points", "hermite_laguerre_legendre",
        "shifted_chebyshev", "igamma_both_regions", "histogram_edges_weights_density",
        "histogram_given_range_and_bins")},
    "sdpa_cpu_backward_mask": "the case moves the mask, which PyTorch's attention refuses to differentiate",
    "as_strided_of_a_view": _PT_CONVENTION + "as_strided reaching outside its input view",
    "cholesky_nonsymmetric_direction": _PT_CONVENTION + "cholesky's backward assumes a symmetric perturbation",
    "cholesky_upper_nonsymmetric_direction": _PT_CONVENTION + "as cholesky_nonsymmetric_direction",
    **{name: "the case gives running statistics tangents; PyTorch's batch norm refuses running statistics "
             "that require grad" for name in (
        "batch_norm_functional_new_stats", "batch_norm_functional_eval", "batch_norm_eval_stat_tangents")},
}


def _params(known):
    out = []
    for (fam, c), i in zip(CASES, IDS):
        marks = [pytest.mark.xfail(reason=known[c.name], strict=True)] if c.name in known else []
        out.append(pytest.param(fam, c, id=i, marks=marks))
    return out


@pytest.fixture(autouse=True)
def _fresh_dynamo_cache():
    # Every case's wrapper below is a closure of one code object, and each is a new dynamo
    # cache entry for it: over a few hundred cases in one worker that passes dynamo's
    # recompile limit (capture.py raises it to 512, then fails loudly, by design).
    torch._dynamo.reset()


def _setup(case, seed=0):
    torch.manual_seed(seed)
    args = case.make_args()
    argnums = case.argnums
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    primals = tuple(args[i] for i in argnums)

    def g(*diff):
        full = list(args)
        for i, d in zip(argnums, diff):
            full[i] = d
        out = case.fn(*full)
        return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return g, primals


def _directions(primals, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)


def _close(a, b, case, scale=10.0):
    torch.testing.assert_close(a, b, atol=case.atol * scale + 1e-6, rtol=case.rtol * scale + 1e-5, equal_nan=True)


@pytest.mark.parametrize("family,case", _params(NESTED_KNOWN))
def test_nested_second_order(family, case):
    g, primals = _setup(case)
    if not primals:
        pytest.skip("no floating arguments")
    u, v = _directions(primals, 1), _directions(primals, 2)

    def first(*p):  # the first-order JVP along v, as a function of the primals
        torch.manual_seed(1234)  # random ops draw alike in every evaluation
        with torch.no_grad():
            return torch_fwd.jvp(g, p, v, path="eager")[1]
    U = tuple(torch.stack([x, 0.5 * x]) for x in u)  # K = 2 at the outer level
    with torch.no_grad():
        _, t = torch_fwd.jvp(first, primals, U, chunked=True, path="eager")
    eps = 1e-5
    plus = first(*(p + eps * d for p, d in zip(primals, u)))
    minus = first(*(p - eps * d for p, d in zip(primals, u)))
    for i, (a, b, ti) in enumerate(zip(plus, minus, t)):
        if not torch.isfinite(a).all() or not torch.isfinite(b).all():
            continue
        fd = (a - b) / (2 * eps)
        _close(ti[0], fd, case, scale=1e3)
        _close(ti[1], 0.5 * fd, case, scale=1e3)


@pytest.mark.parametrize("family,case", [p for p in _params(AUTOGRAD_KNOWN) if p.values[1].graph])
def test_graph_path_tangent_is_differentiable_by_autograd(family, case):
    g, primals = _setup(case)
    if not primals:
        pytest.skip("no floating arguments")
    v = _directions(primals, 2)
    weights = None

    def loss(p, t):
        nonlocal weights
        torch.manual_seed(1234)
        outs, touts = torch_fwd.jvp(g, p, t, path="graph")
        if weights is None:
            gen = torch.Generator().manual_seed(3)
            weights = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in touts]
        # (the primal outputs come from the op itself: their backward is PyTorch's)
        return sum((w * to).sum() for w, to in zip(weights, touts) if torch.isfinite(to).all())

    p = tuple(x.detach().requires_grad_() for x in primals)
    t = tuple(x.detach().requires_grad_() for x in v)
    L = loss(p, t)
    if not isinstance(L, torch.Tensor) or not L.requires_grad:
        pytest.skip("no differentiable output")
    gp = torch.autograd.grad(L, p + t, allow_unused=True)
    gp = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(gp, p + t)]
    dp, dt = _directions(primals, 4), _directions(primals, 5)
    eps = 1e-5
    with torch.no_grad():
        fd = (loss(tuple(x + eps * d for x, d in zip(primals, dp)), v)
              - loss(tuple(x - eps * d for x, d in zip(primals, dp)), v)) / (2 * eps)
        # the loss is affine in the tangents: a unit step is exact
        lin = loss(primals, tuple(x + d for x, d in zip(v, dt))) - loss(primals, v)
    n = len(primals)
    _close(sum((gi * d).sum() for gi, d in zip(gp[:n], dp)), fd, case, scale=1e3)
    _close(sum((gi * d).sum() for gi, d in zip(gp[n:], dt)), lin, case, scale=10)
