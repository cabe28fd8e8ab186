"""The lookup order past the rule table: decomposition, PyTorch's forward-AD formula,
the double-vjp identity, then a loud NoRuleError -- never a silent zero."""
import pytest
import torch
import torch.nn.functional as F

import torch_fwd
from torch_fwd.registry import lookup
from torch_fwd.testing import check_frule

aten = torch.ops.aten
D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


@pytest.mark.parametrize("fn,op", [
    (lambda x: F.glu(x, -1), aten.glu.default),
    (lambda x: F.softshrink(x, 0.3), aten.softshrink.default),
    (torch.sinc, aten.sinc.default),
    (lambda x: torch.special.xlog1py(x, x.abs()), aten.special_xlog1py.default),
])
def test_decomposition_fallback(fn, op):
    assert lookup(op) is None  # so this really exercises the fallback
    check_frule(fn, rand(3, 4))


@pytest.mark.parametrize("fn,op", [
    (lambda x: torch.logcumsumexp(x, 1), aten.logcumsumexp.default),
    (lambda x: torch.cummax(x, 1).values, aten.cummax.default),
])
def test_forward_ad_fallback(fn, op):
    assert lookup(op) is None
    check_frule(fn, rand(3, 4))


def test_forward_ad_fallback_on_an_expanded_input():
    """make_dual cannot lay a tangent out like an expanded primal: the fallback copies it."""
    x = rand(3)
    check_frule(lambda x: torch.logcumsumexp(x.expand(4, 3), 1), x)


def test_non_differentiable_in_pytorch_is_an_error_not_a_zero():
    # Ai'(x) is not among torch.special's functions, so torch_fwd has no rule for airy_ai
    x, v = rand(4).abs() + 0.5, rand(4)
    _, t = torch.func.jvp(torch.special.airy_ai, (x,), (v,))
    assert torch.count_nonzero(t) == 0  # torch.func.jvp: silently zero, the truth is Ai'(x) v
    for path in ("eager", "auto"):
        with pytest.raises(torch_fwd.NoRuleError, match="airy_ai"):
            torch_fwd.jvp(torch.special.airy_ai, (x,), (v,), path=path)


def test_cholesky_inverse_does_not_use_pytorchs_wrong_formula():
    a = rand(3, 3)
    L = torch.linalg.cholesky(a @ a.T + 3 * torch.eye(3, dtype=D))
    check_frule(lambda L: torch.cholesky_inverse(L.tril()), L, check_torch_func=False)


def test_graph_path_error_names_the_source_line():
    def f(x):
        return torch.special.airy_ai(x) + 1  # the line the error names
    with pytest.raises(torch_fwd.NoRuleError) as info:
        torch_fwd.make_jvp_graph(f, rand(3))
    assert "test_fallbacks.py" in str(info.value) and "airy_ai(x) + 1" in str(info.value)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_complex_inputs_use_pytorchs_formulas(path):
    def f(z, w):
        return (z.abs() * torch.exp(z) + z * w.conj()).sum(-1) + (z @ w.T).real
    z = torch.randn(3, 4, dtype=torch.complex128)
    w = torch.randn(3, 4, dtype=torch.complex128)
    tz, tw = torch.randn_like(z), torch.randn_like(w)
    out, t = torch_fwd.jvp(f, (z, w), (tz, tw), path=path)
    ref_out, ref_t = torch.func.jvp(f, (z, w), (tz, tw))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_complex_views_and_construction(path):
    def f(re, im):
        z = torch.complex(re, im) * torch.polar(re.abs() + 1, im)
        return torch.view_as_real(z.conj() * 2).sum(-1) + z.real * z.imag
    re, im = rand(3, 4), rand(3, 4)
    tr, ti = rand(3, 4), rand(3, 4)
    _, t = torch_fwd.jvp(f, (re, im), (tr, ti), path=path)
    _, ref = torch.func.jvp(f, (re, im), (tr, ti))
    torch.testing.assert_close(t, ref)


@pytest.mark.parametrize("op,args", [
    (aten.nll_loss.default, lambda x: (x, torch.tensor([1, 0, 3]), None, 0)),  # reduction="none"
    (aten.var.default, lambda x: (x, False)),  # unbiased=False
])
def test_decomposition_whose_parameters_differ_from_the_schema_is_not_used(op, args):
    """torch._decomp maps these overloads to torch-level references that read the schema's
    4th/2nd argument as another parameter (size_average, dim): a silent wrong answer if
    used. Called below autograd (as inside a custom op's rule), the op reaches the
    fallback itself, which must take the C++ decomposition instead."""
    from torch_fwd.engine import jvp_op
    x, v = rand(3, 4), rand(3, 4)
    a = args(x)
    out, t = jvp_op(op, a, (v.unsqueeze(0),) + (None,) * (len(a) - 1))
    ref_out, ref_t = torch.func.jvp(lambda x: op(*args(x)), (x,), (v,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t[0], ref_t)
