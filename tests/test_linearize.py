"""linearize: the primal once, the linear tangent map many times."""
import pytest
import torch
import torch.nn.functional as F

import torch_fwd

D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


def _model(x, w):
    W1 = torch.linspace(-1, 1, 8 * 16, dtype=D).reshape(8, 16)
    h = F.layer_norm(torch.tanh(x @ W1), (16,))
    return {"y": F.softplus(h[:, :3] * w).sum(-1), "h": h, "s": torch.softmax(h, -1)}


def fd(f, primals, tangents, eps=1e-6):
    plus = f(*(p + eps * t for p, t in zip(primals, tangents)))
    minus = f(*(p - eps * t for p, t in zip(primals, tangents)))
    return {k: (plus[k] - minus[k]) / (2 * eps) for k in plus}


def test_matches_torch_func_and_finite_differences():
    x, w = rand(5, 8), rand(3)
    out, jvp_fn = torch_fwd.linearize(_model, x, w)
    ref_out = _model(x, w)
    for k in ref_out:
        torch.testing.assert_close(out[k], ref_out[k])
    for seed in range(3):
        torch.manual_seed(seed)
        v = (rand(5, 8), rand(3))
        t = jvp_fn(*v)
        ref = torch.func.jvp(_model, (x, w), v)[1]
        num = fd(_model, (x, w), v)
        for k in ref:
            torch.testing.assert_close(t[k], ref[k])
            torch.testing.assert_close(t[k], num[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_chunked(k):
    x, w = rand(5, 8), rand(3)
    _, jvp_fn = torch_fwd.linearize(_model, x, w)
    V, VW = rand(k, 5, 8), rand(k, 3)
    t = jvp_fn(V, VW, chunked=True)
    assert t["y"].shape == (k, 5)
    for i in range(k):
        ref = torch.func.jvp(_model, (x, w), (V[i], VW[i]))[1]
        for key in ref:
            torch.testing.assert_close(t[key][i], ref[key])


def test_zero_tangents_give_zeros():
    x, w = rand(5, 8), rand(3)
    _, jvp_fn = torch_fwd.linearize(_model, x, w)
    t = jvp_fn(torch.zeros_like(x), torch.zeros_like(w))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in t.values())


def test_the_function_runs_once_and_the_tangent_map_holds_no_primal_work():
    calls = []

    def f(x):
        calls.append(1)
        return torch.tanh(x).exp().sum()
    x = rand(4)
    out, jvp_fn = torch_fwd.linearize(f, x)
    for _ in range(5):
        jvp_fn(rand(4))
    assert len(calls) == 1
    tangent_code = jvp_fn._for_chunk(1)[0].code
    # (tanh_backward(t, y) is tangent work: linear in t, y a residual)
    assert "aten.tanh.default" not in tangent_code and "aten.exp.default" not in tangent_code, tangent_code


def test_repeated_calls_share_nothing_with_each_other():
    # an output independent of the input (a zero tangent made once) and a function that
    # writes into a buffer it allocates: no call may change what an earlier one returned
    def f(x):
        buf = torch.zeros(3, dtype=x.dtype)
        buf[1] = x.sin().sum()
        return buf * 2, torch.ones(2, dtype=x.dtype)
    x = rand(4)
    _, jvp_fn = torch_fwd.linearize(f, x)
    v1, v2 = rand(4), rand(4)
    t1 = jvp_fn(v1)
    first = [t.clone() for t in t1]
    t1[1].add_(5)
    jvp_fn(v2)
    t1b = jvp_fn(v1)
    torch.testing.assert_close(list(t1b), first)
    torch.testing.assert_close(t1[0], first[0])
    torch.testing.assert_close(t1b[0], torch.func.jvp(f, (x,), (v1,))[1][0])


def test_errors_are_clear_and_inputs_untouched():
    x = rand(3)
    xc = x.clone()
    _, jvp_fn = torch_fwd.linearize(torch.sin, x)
    with pytest.raises(ValueError, match="shape"):
        jvp_fn(rand(4))
    with pytest.raises(TypeError, match="Tensor"):
        jvp_fn(3.0)
    with pytest.raises(TypeError, match="dtype|float32"):
        jvp_fn(torch.randn(3))
    with pytest.raises(TypeError, match="callable"):
        torch_fwd.linearize(3, x)

    def data_dependent(x):
        return x.sin() if x.sum() > 0 else x.cos()
    with pytest.raises(RuntimeError, match="could not be traced"):
        torch_fwd.linearize(data_dependent, x)
    assert torch.equal(x, xc)


def test_nested_jvp_inside_linearize():
    # d/dx of (d/dx sin(x) . v) along u = -sin(x) v u
    x, u, v = rand(4), rand(4), rand(4)
    _, jvp_fn = torch_fwd.linearize(lambda x: torch_fwd.jvp(torch.sin, (x,), (v,))[1], x)
    torch.testing.assert_close(jvp_fn(u), -torch.sin(x) * v * u)
