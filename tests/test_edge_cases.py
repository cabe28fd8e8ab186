"""Layouts, dtypes, sizes and grad modes the contract must survive, in both paths."""
import pytest
import torch
import torch.nn.functional as F

import torch_fwd
from torch_fwd.testing import check_frule

D = torch.float64
PATHS = ["eager", "graph"]


def f(x, w):
    return F.silu(x @ w).softmax(-1) * x.sum()


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_and_expanded_primals_and_tangents(path):
    x = torch.randn(5, 3, dtype=D).T            # transposed
    w = torch.randn(5, 1, dtype=D).expand(5, 4)  # stride 0
    vx = torch.randn(3, 5, 2, dtype=D)[..., 0]  # strided tangent
    vw = torch.randn(4, 5, dtype=D).T
    out, t = torch_fwd.jvp(f, (x, w), (vx, vw), path=path)
    # (torch.func.jvp itself cannot take an expanded primal: compare on contiguous copies)
    ref_out, ref_t = torch.func.jvp(f, (x.contiguous(), w.contiguous()), (vx, vw))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)


@pytest.mark.parametrize("path", PATHS)
def test_scalar_and_empty_tensors(path):
    s, v = torch.tensor(0.7, dtype=D), torch.tensor(2.0, dtype=D)
    out, t = torch_fwd.jvp(lambda s: torch.sin(s) * s, (s,), (v,), path=path)
    torch.testing.assert_close(t, (torch.cos(s) * s + torch.sin(s)) * v)
    e = torch.randn(0, 3, dtype=D)
    out, t = torch_fwd.jvp(lambda e: e.exp().sum(0), (e,), (e,), path=path)
    assert t.shape == (3,) and torch.count_nonzero(t) == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision(path, dtype, tol):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    vx, vw = torch.randn_like(x), torch.randn_like(w)
    out, t = torch_fwd.jvp(f, (x, w), (vx, vw), path=path)
    assert t.dtype == dtype
    _, ref_t = torch.func.jvp(f, (x.double(), w.double()), (vx.double(), vw.double()))
    torch.testing.assert_close(t.double(), ref_t, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("path", PATHS)
def test_grad_modes(path):
    x, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    with torch.no_grad():
        _, t1 = torch_fwd.jvp(torch.sin, (x,), (v,), path=path)
    with torch.inference_mode():
        xi, vi = x.clone(), v.clone()
        _, t2 = torch_fwd.jvp(torch.sin, (xi,), (vi,), path="eager")
    torch.testing.assert_close(t1, torch.cos(x) * v)
    torch.testing.assert_close(t2, torch.cos(x) * v)


def test_graph_path_outputs_can_be_backpropagated():
    x = torch.randn(3, dtype=D, requires_grad=True)
    v = torch.randn(3, dtype=D)
    out, t = torch_fwd.jvp(lambda x: torch.sin(x) * x, (x,), (v,), path="graph")
    (out.sum() + t.sum()).backward()
    # d/dx [sin x * x + (cos x * x + sin x) v]
    expected = torch.cos(x) * x + torch.sin(x) + (-torch.sin(x) * x + 2 * torch.cos(x)) * v
    torch.testing.assert_close(x.grad, expected.detach())


def test_eager_path_records_autograd_history():
    lin = torch.nn.Linear(3, 2).double()  # parameters require grad

    def f(x):
        if x.sum() > -100:  # data-dependent: the eager path runs
            return lin(x)
        return x
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    v = torch.randn(4, 3, dtype=D, requires_grad=True)
    grads = []
    for jvp in (lambda *a: torch_fwd.jvp(*a, path="eager"), torch_fwd.jvp, torch.func.jvp):
        out, t = jvp(f, (x,), (v,))
        if jvp is not torch.func.jvp:
            assert torch_fwd.explain().startswith(("eager", "regions"))
        loss = (out * t).sum() + (t ** 2).sum()
        grads.append(torch.autograd.grad(loss, [x, v, lin.weight, lin.bias]))
    for ours_eager, ours_regions, ref in zip(*grads):
        torch.testing.assert_close(ours_eager, ref)
        torch.testing.assert_close(ours_regions, ref)
    with torch.no_grad():
        _, t = torch_fwd.jvp(f, (x,), (v,))
    assert t.grad_fn is None
    torch.testing.assert_close(t, v @ lin.weight.T.detach())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes", [((10,), (10, 5)), ((3, 10), (10,)), ((10,), (2, 10, 5)), ((10,), (10,))])
def test_matmul_shapes_whose_aten_kernel_squeezes_in_place(path, shapes):
    """ATen's matmul squeezes its result in place (squeeze_): both paths must keep shapes."""
    a, b = torch.randn(*shapes[0], dtype=D), torch.randn(*shapes[1], dtype=D)
    ta, tb = torch.randn_like(a), torch.randn_like(b)
    out, t = torch_fwd.jvp(torch.matmul, (a, b), (ta, tb), path=path)
    ref_out, ref_t = torch.func.jvp(torch.matmul, (a, b), (ta, tb))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)  # shapes included


@pytest.mark.parametrize("path", ["graph", "auto", "eager"])
def test_quantile_in_place_squeeze(path):
    """quantile's C++ kernel squeezes in place: the graph pass rewrites that out of place,
    the eager path changes the Dual's own shape."""
    x, v = torch.randn(7, 3, dtype=D), torch.randn(7, 3, dtype=D)
    f = lambda x: torch.quantile(x, 0.3, dim=0)  # noqa: E731
    _, t = torch_fwd.jvp(f, (x,), (v,), path=path)
    torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])


def test_in_place_shape_ops_in_user_code_eager():
    """squeeze_/unsqueeze_/transpose_/t_/as_strided_ on tensors with tangents, on a view
    (the tangent must still reach the base through later writes) and on a fresh buffer."""
    def f(x):
        y = x * 2
        y.unsqueeze_(0).transpose_(0, 2)
        buf = torch.zeros(4, 3, dtype=x.dtype)
        row = buf[1:3]
        row.t_()
        row.copy_(x[:2, :3].T)  # a write through the reshaped view reaches buf
        z = x.clone()
        z.as_strided_((2, 2), (1, 4))
        return y.sin(), buf * 3, z.exp()
    x, v = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    out, t = torch_fwd.jvp(f, (x,), (v,), path="eager")
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    for a, b in zip(out + t, ref_out + ref_t):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_no_grad_and_detach_inside_match_torch_func(path):
    """Forward mode ignores grad mode (as torch.func.jvp does); detach cuts the tangent."""
    def f(x):
        with torch.no_grad():
            y = x * 2
        return (y + x).sin() + x.detach().exp() * x
    x, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, t = torch_fwd.jvp(f, (x,), (v,), path=path)
    torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])


@pytest.mark.parametrize("path", PATHS)
def test_histogram_at_a_bin_edge_has_the_one_sided_derivative_zero(path):
    """A count jumps where x crosses a bin edge: there the rule returns 0, the derivative
    on either side (finite differences see the jump instead)."""
    x, v = torch.tensor([-4.5, 0.0, 1.0], dtype=D), torch.randn(3, dtype=D)
    bins = torch.tensor([-5.0, -1.0, 1.0], dtype=D)  # x[2] sits on the last edge
    _, t = torch_fwd.jvp(lambda x: torch.histogram(x, bins).hist, (x,), (v,), path=path)
    assert torch.equal(t, torch.zeros(2, dtype=D))


def _with_out(op, *shape_of_out):
    def f(*args):
        buf = torch.empty(*shape_of_out, dtype=args[0].dtype)
        res = op(*args, out=buf)
        return res * 2 + buf  # the returned tensor and the buffer are one
    return f


GRAPH_AND_EAGER = ("eager", "graph")


@pytest.mark.parametrize("fn,args,paths", [
    (_with_out(torch.sin, 3, 4), lambda: (torch.randn(3, 4, dtype=D),), GRAPH_AND_EAGER),
    (_with_out(torch.add, 3, 4), lambda: (torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D)), GRAPH_AND_EAGER),
    # functionalization cannot rewrite matmul.out (a composite op with an aliased output):
    # the graph path refuses it and jvp's default path runs it eagerly
    (_with_out(torch.matmul, 3, 5), lambda: (torch.randn(3, 4, dtype=D), torch.randn(4, 5, dtype=D)), ("eager", "auto")),
    (_with_out(lambda x, out: torch.sum(x, 1, out=out), 3), lambda: (torch.randn(3, 4, dtype=D),), GRAPH_AND_EAGER),
    (_with_out(lambda x, out: torch.cumsum(x, 0, out=out), 3, 4), lambda: (torch.randn(3, 4, dtype=D),),
     GRAPH_AND_EAGER),
    # solve restrides its out= result (column-major) and resizes its hidden LU/pivots buffers;
    # dynamo refuses a non-contiguous out=, so jvp's default path runs it eagerly
    (_with_out(lambda a, b, out: torch.linalg.solve(a, b, out=out), 3, 2),
     lambda: (torch.randn(3, 3, dtype=D) + 3 * torch.eye(3, dtype=D), torch.randn(3, 2, dtype=D)), ("eager", "auto")),
])
def test_out_variants(fn, args, paths):
    """out= writes the result and its tangent into the buffer (torch.func refuses out=
    with tangents: finite differences are the oracle)."""
    check_frule(fn, *args(), paths=paths)
