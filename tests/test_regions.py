"""jvp's default path on functions with graph breaks: dynamo captures them region by
region, each region's JVP graph runs through the graph path, the Python between regions
runs on Duals. Checked against torch.func.jvp and float64 finite differences, K = 1 and
K > 1, zero tangents, autograd through the outputs, and the things a region-by-region run
must not do: run the user's code twice, swallow the user's exception, serve a stale
region."""
import numpy as np
import pytest
import torch

import torch_fwd
from benchmarks import cases as C

D = torch.float64


def rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=D) * scale


def fd(f, primals, tangents, eps=1e-6):
    plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
    minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
    return (plus - minus) / (2 * eps)


BREAKS = [C.break_branch, C.break_print, C.break_numpy, C.break_item]


def _inputs():
    torch.manual_seed(0)
    return (rand(16, 16, scale=0.5 / 4), rand(16, 8)), (rand(16, 16), rand(16, 8))


def _numpy_scale_fixed(W, x):
    """break_numpy with its NumPy-computed scale a constant, as the JVP treats it
    (torch.func cannot run the NumPy call; finite differences would move the scale)."""
    h = C._layer(W, C._layer(W, x))
    return C._layer(W, C._layer(W, h / SCALE)).sum()


SCALE = None


@pytest.mark.parametrize("f", BREAKS + [C.iterate_to_tolerance], ids=lambda f: f.__name__)
def test_against_torch_func_and_finite_differences(f):
    global SCALE
    p, t = _inputs()
    SCALE = float(np.abs(C._layer(p[0], C._layer(*p)).numpy()).max())
    for _ in range(2):  # the second call reuses the regions
        out, tout = torch_fwd.jvp(f, p, t)
        why = torch_fwd.explain()
        ref_out, ref_t = torch.func.jvp(f if f is not C.break_numpy else _numpy_scale_fixed, p, t)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(tout, ref_t)
        if f not in (C.break_numpy, C.break_item):  # (their scale is a constant to the JVP)
            torch.testing.assert_close(tout, fd(f, p, t), rtol=1e-5, atol=1e-5)
    if f is C.iterate_to_tolerance:
        # (a graph break inside a loop: dynamo runs the loop itself uncompiled, and each
        # step, a function of its own, as a region)
        assert why.startswith("regions"), why
    else:
        assert why.startswith("regions (2 graphs"), why


@pytest.mark.parametrize("f", BREAKS, ids=lambda f: f.__name__)
def test_chunked_and_zero_tangents(f):
    p, _ = _inputs()
    K = 3
    ts = (rand(K, 16, 16), torch.zeros(K, 16, 8, dtype=D))
    out, touts = torch_fwd.jvp(f, p, ts, chunked=True)
    assert torch_fwd.explain().startswith("regions"), torch_fwd.explain()
    for k in range(K):  # each direction as torch.func gives it (NumPy: as the eager path does)
        ref = torch_fwd.jvp(f, p, (ts[0][k], ts[1][k]), path="eager") if f is C.break_numpy else \
            torch.func.jvp(f, p, (ts[0][k], ts[1][k]))
        torch.testing.assert_close(touts[k], ref[1])
    out, t = torch_fwd.jvp(f, p, (torch.zeros(16, 16, dtype=D), torch.zeros(16, 8, dtype=D)))
    assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("f", [C.break_branch, C.break_print], ids=lambda f: f.__name__)
def test_gradients_through_primal_and_tangent(f):
    (W, x), (tw, tx) = _inputs()
    W1 = W.clone().requires_grad_()
    out, t = torch_fwd.jvp(lambda a: f(W1, a), (x,), (tx,))
    (out + t ** 2).backward()
    W2 = W.clone().requires_grad_()
    ro, rt = torch.func.jvp(lambda a: f(W2, a), (x,), (tx,))
    (ro + rt ** 2).backward()
    torch.testing.assert_close(W1.grad, W2.grad)


def test_the_branch_taken_follows_the_values():
    f = C.break_branch
    (W, x), (tw, tx) = _inputs()
    for scale in (1e-3, 10.0):  # either side of the branch
        p = (W, x * scale)
        out, t = torch_fwd.jvp(f, p, (tw, tx))
        torch.testing.assert_close(t, torch.func.jvp(f, p, (tw, tx))[1])


def test_user_code_runs_once_per_call_and_its_exception_arrives_as_raised():
    calls = []

    def f(x):
        y = torch.sin(x)
        calls.append(1)
        print(end="")  # a graph break
        if x.sum() > 100:
            raise ValueError("too large")
        return y * 2

    x, v = rand(4), rand(4)
    torch_fwd.jvp(f, (x,), (v,))
    assert torch_fwd.explain().startswith("regions"), torch_fwd.explain()
    n = len(calls)
    torch_fwd.jvp(f, (x,), (v,))
    assert len(calls) - n == 1
    with pytest.raises(ValueError, match="too large"):
        torch_fwd.jvp(f, (x + 1000,), (v,))


def test_a_global_changed_between_calls_is_seen():
    g = {"scale": 2.0}

    def f(x):
        y = torch.sin(x) * g["scale"]
        print(end="")
        return y * g["scale"]

    x, v = rand(4), rand(4)
    for scale in (2.0, 3.0):
        g["scale"] = scale
        _, t = torch_fwd.jvp(f, (x,), (v,))
        torch.testing.assert_close(t, torch.cos(x) * v * scale ** 2)


def test_a_buffer_allocated_before_a_break_and_written_after():
    def f(x):
        buf = torch.zeros(3, dtype=x.dtype)
        print(end="")
        buf[0] = x.sin().sum()
        buf[1] = x.prod()
        return buf * 2

    x, v = rand(4), rand(4)
    for _ in range(2):
        out, t = torch_fwd.jvp(f, (x,), (v,))
        torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])


def test_a_module_with_a_break_in_its_forward():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            if h.mean() > 10:
                h = h * 0
            return self.b(h)

    net = Net().double()
    x, v = rand(3, 4), rand(3, 4)
    out, t = torch_fwd.JVP(net)(x, tangents=(v,))
    torch.testing.assert_close(t, torch.func.jvp(net, (x,), (v,))[1])
    params = {n: rand(*p.shape) for n, p in net.named_parameters()}
    out, t = torch_fwd.JVP(net, wrt="params")(x, param_tangents=params)
    names = list(params)
    ref = torch.func.jvp(lambda *ps: torch.func.functional_call(net, dict(zip(names, ps)), (x,)),
                         tuple(dict(net.named_parameters()).values()), tuple(params.values()))[1]
    torch.testing.assert_close(t, ref)


def test_a_missing_rule_in_a_region_is_reported_by_name():
    lib = torch.library.Library("torch_fwd_regions_test", "FRAGMENT")
    lib.define("noderiv(Tensor x) -> Tensor")
    lib.impl("noderiv", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("noderiv", lambda x: torch.empty_like(x), "Meta")

    def f(x):
        y = torch.sin(x)
        print(end="")
        return torch.ops.torch_fwd_regions_test.noderiv(y)

    with pytest.raises(Exception, match="noderiv"):
        torch_fwd.jvp(f, (rand(3),), (rand(3),))


def test_a_nested_jvp_after_a_break():
    u = rand(3)

    def f(a):
        print(end="")
        return torch_fwd.jvp(lambda b: b.sin() * b, (a,), (u,))[1].sum()

    x, v = rand(3), rand(3)
    for _ in range(2):
        _, t = torch_fwd.jvp(f, (x,), (v,))
        ref = torch.func.jvp(lambda a: torch.func.jvp(lambda b: b.sin() * b, (a,), (u,))[1].sum(), (x,), (v,))[1]
        torch.testing.assert_close(t, ref)
