"""Nested jvp: a jvp inside a function being differentiated gives second (and higher)
directional derivatives; each level's perturbation is its own (no confusion)."""
import pytest
import torch
import torch.nn.functional as F

import torch_fwd

D = torch.float64
PATHS = ["eager", "graph", "auto"]


def rand(*s):
    return torch.randn(*s, dtype=D)


def fd2(f, x, u, v, eps=1e-4):
    """Mixed second difference: d^2/ds dt f(x + s u + t v) at 0."""
    return (f(x + eps * u + eps * v) - f(x + eps * u - eps * v)
            - f(x - eps * u + eps * v) + f(x - eps * u - eps * v)) / (4 * eps * eps)


def mixed(x, W1, W2):
    h = torch.tanh(x @ W1)
    return F.softplus(h @ W2).sum(-1) + F.gelu(h).pow(2).mean() + torch.logsumexp(x, -1) + torch.softmax(h, -1)[:, 0]


@pytest.mark.parametrize("outer", PATHS)
@pytest.mark.parametrize("inner", PATHS)
def test_second_directional_derivative(outer, inner):
    torch.manual_seed(0)
    x, u, v = rand(3, 4), rand(3, 4), rand(3, 4)
    W1, W2 = rand(4, 5), rand(5, 2)
    f = lambda x: mixed(x, W1, W2)  # noqa: E731

    def df_v(x):
        return torch_fwd.jvp(f, (x,), (v,), path=inner)[1]
    out, t = torch_fwd.jvp(df_v, (x,), (u,), path=outer)
    ref_out, ref_t = torch.func.jvp(lambda x: torch.func.jvp(f, (x,), (v,))[1], (x,), (u,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)
    torch.testing.assert_close(t, fd2(f, x, u, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_second_derivative_of_layer_norm_where_torch_func_is_wrong(path):
    # torch.func's layer_norm JVP gives its saved mean/rstd a zero tangent, so its nested
    # jvp is silently wrong; ours matches finite differences
    torch.manual_seed(0)
    x, u, v = rand(3, 4), rand(3, 4), rand(3, 4)
    w, b = rand(4), rand(4)
    f = lambda x: F.layer_norm(x, (4,), w, b)  # noqa: E731
    _, t = torch_fwd.jvp(lambda x: torch_fwd.jvp(f, (x,), (v,))[1], (x,), (u,), path=path)
    torch.testing.assert_close(t, fd2(f, x, u, v), rtol=1e-5, atol=1e-5)
    ref = torch.func.jvp(lambda x: torch.func.jvp(f, (x,), (v,))[1], (x,), (u,))[1]
    assert not torch.allclose(ref, t, atol=1e-3)  # if this starts failing, torch.func got fixed


@pytest.mark.parametrize("outer", ["eager", "graph"])
@pytest.mark.parametrize("k_outer,k_inner", [(1, 3), (3, 1), (2, 4)])
def test_chunking_at_either_level(outer, k_outer, k_inner):
    torch.manual_seed(1)
    x = rand(5)
    U, V = rand(k_outer, 5), rand(k_inner, 5)
    f = lambda x: (torch.sin(x) * x.exp()).sum() + x.prod()  # noqa: E731

    def df(x):  # (k_inner,) first derivatives along V
        return torch_fwd.jvp(f, (x,), (V,), chunked=True)[1]
    _, t = torch_fwd.jvp(df, (x,), (U,), chunked=True, path=outer)
    assert t.shape == (k_outer, k_inner)
    H = torch.func.hessian(f)(x)
    torch.testing.assert_close(t, U @ H @ V.T)


@pytest.mark.parametrize("path", PATHS)
def test_no_perturbation_confusion(path):
    # d/dx [x * d/dy (x + y)] = d/dx [x * 1] = 1: a tangent leaking between levels gives 2
    x = rand(3)
    one = torch.ones_like(x)

    def f(x):
        return x * torch_fwd.jvp(lambda y: x + y, (x,), (one,))[1]
    _, t = torch_fwd.jvp(f, (x,), (one,), path=path)
    torch.testing.assert_close(t, one)


@pytest.mark.parametrize("path", PATHS)
def test_inner_function_closes_over_the_outer_variable(path):
    # g(x) = d/dy [x * y^2] along v at y = x = 2 x^2 v;  dg along u = 4 x u v
    x, u, v = rand(4), rand(4), rand(4)

    def g(x):
        return torch_fwd.jvp(lambda y: x * y ** 2, (x,), (v,))[1]
    _, t = torch_fwd.jvp(g, (x,), (u,), path=path)
    torch.testing.assert_close(t, 4 * x * u * v)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_third_derivative_three_levels(path):
    x = rand(6)
    one = torch.ones_like(x)

    def d1(x):
        return torch_fwd.jvp(torch.sin, (x,), (one,))[1]

    def d2(x):
        return torch_fwd.jvp(d1, (x,), (one,))[1]
    _, t = torch_fwd.jvp(d2, (x,), (one,), path=path)
    torch.testing.assert_close(t, -torch.cos(x))


@pytest.mark.parametrize("path", PATHS)
def test_zero_outer_tangent_gives_zero(path):
    x, v = rand(3), rand(3)

    def g(x):
        return torch_fwd.jvp(torch.tanh, (x,), (v,))[1]
    _, t = torch_fwd.jvp(g, (x,), (torch.zeros_like(x),), path=path)
    assert torch.equal(t, torch.zeros_like(t))


def test_nested_explain_says_what_ran():
    x, v = rand(3), rand(3)

    def g(x):
        return torch_fwd.jvp(torch.tanh, (x,), (v,))[1]
    torch_fwd.jvp(g, (x,), (v,), path="graph")
    assert torch_fwd.explain().startswith("graph (traced once")
    torch_fwd.jvp(g, (x,), (v,))
    assert torch_fwd.explain().startswith("eager")


def test_inside_torch_func_transform_is_refused_loudly():
    x = rand(2, 3)
    with pytest.raises(NotImplementedError, match="inside a torch.func transform"):
        torch.func.vmap(lambda x: torch_fwd.jvp(torch.sin, (x,), (x,))[1])(x)
