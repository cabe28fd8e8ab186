"""The eager path records autograd history: a loss built from its outputs and tangents
back-propagates to the inputs, the tangents and the parameters the function reads.

Oracles: the gradient of the loss along a random direction against central finite
differences of the loss (float64; the forward values are torch_fwd's own, checked
elsewhere), and torch.func.jvp's gradients where they are right (torch.func's second
derivative of layer_norm is not: tests/test_nested.py)."""
import pytest
import torch
import torch.nn.functional as F

import torch_fwd

D = torch.float64


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


NET = _mlp()
W = torch.randn(3, 3, dtype=D, requires_grad=True)
B = torch.randn(3, dtype=D, requires_grad=True)


def mlp(x):
    return NET(x)


def buffer_writes(x):
    buf = torch.zeros(4, 3, dtype=D)
    buf[1:] = torch.tanh(x @ W)
    buf[0] += B
    return buf.sum(0) * x.sum()


def view_inplace(x):
    y = x * 1
    y[:, 0].mul_(W[0, 0])
    y.T[1].add_(B.sum())
    return y.exp()


def inplace_view_op(x):
    y = (x @ W).unsqueeze(0)
    y.squeeze_(0)
    return y * B


def no_grad_inside(x):
    with torch.no_grad():
        s = (x * W.sum()).sum()
    return x * s + x @ W


def detached(x):
    return x.detach() * W[0] + x * W[1]


def norms(x):
    return F.layer_norm(x @ W, (3,), B, B) + F.softmax(x @ W, -1) + F.gelu(x) * B


def copies(x):
    t = torch.empty(3, 3, dtype=D)
    t.copy_(x @ W)
    return torch.cat([t.cumsum(0), x * B]).sum(0)


CASES = {f.__name__: f for f in (mlp, buffer_writes, view_inplace, inplace_view_op, no_grad_inside, detached, norms,
                                 copies)}
TORCH_FUNC_WRONG = {"norms"}  # torch.func's double derivative of layer_norm
STOP_GRADIENT = {"no_grad_inside", "detached"}  # autograd is told to ignore what FD sees


def _params():
    return [W, B, *NET.parameters()]


def _loss(out, t):
    return (out ** 2).sum() + (t.sin() * out).sum() + t.sum() ** 2


def _graph_break(f):
    def g(x):
        if x.sum() > -1e6:  # a branch on a value: dynamo cannot capture it whole
            return f(x)
        return x
    return g


def _ours(f, x, v, chunked, **kw):
    out, t = torch_fwd.jvp(_graph_break(f), (x,), (v,), chunked=chunked, **kw)
    return _loss(out, t)


@pytest.mark.parametrize("path", ["eager", "auto"], ids=["eager", "regions"])
@pytest.mark.parametrize("chunked", [False, True], ids=["K1", "K3"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_of_a_loss_over_the_eager_path(name, chunked, path):
    # (auto: the graph break makes the function run region by region, the Python between
    # regions on Duals as the eager path runs it)
    f = CASES[name]
    torch.manual_seed(1)
    x = torch.randn(3, 3, dtype=D, requires_grad=True)
    v = torch.randn((3, 3, 3) if chunked else (3, 3), dtype=D, requires_grad=True)
    leaves = [x, v, *_params()]
    loss = _ours(f, x, v, chunked, path=path)
    assert torch_fwd.explain().startswith("eager" if path == "eager" else "regions"), torch_fwd.explain()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)

    if name not in STOP_GRADIENT and path == "eager":  # (the two paths are compared below)
        _check_against_finite_differences(f, x, v, chunked, leaves, grads)
    if name not in TORCH_FUNC_WRONG:
        _check_against_torch_func(f, x, v, chunked, leaves, grads)


def _check_against_finite_differences(f, x, v, chunked, leaves, grads):
    """The gradient along one random direction in every leaf at once."""
    dirs = [torch.randn_like(p) for p in leaves]
    along = sum((g * d).sum() for g, d in zip(grads, dirs) if g is not None)
    h = 1e-6
    with torch.no_grad():
        def shifted(s):
            saved = [p.clone() for p in leaves]
            for p, d in zip(leaves, dirs):
                p.add_(s * d)
            try:
                return _ours(f, x, v, chunked)
            finally:
                for p, c in zip(leaves, saved):
                    p.copy_(c)
        fd = (shifted(h) - shifted(-h)) / (2 * h)
    torch.testing.assert_close(along, fd, rtol=1e-5, atol=1e-6)


def _check_against_torch_func(f, x, v, chunked, leaves, grads):
    if chunked:
        pairs = [torch.func.jvp(f, (x,), (v[i],)) for i in range(v.shape[0])]
        ref_loss = _loss(pairs[0][0], torch.stack([p[1] for p in pairs]))
    else:
        ref_loss = _loss(*torch.func.jvp(f, (x,), (v,)))
    ref = torch.autograd.grad(ref_loss, leaves, allow_unused=True)
    for ours, theirs in zip(grads, ref):
        if theirs is None:
            assert ours is None or torch.count_nonzero(ours) == 0
        else:
            torch.testing.assert_close(ours, theirs)


def test_jvp_wrt_parameters_of_a_module_on_the_eager_path():
    net = _mlp()
    x = torch.randn(5, 3, dtype=D)
    tangents = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    out, t = torch_fwd.JVP(net, wrt="params", path="eager")(x, param_tangents=tangents)
    ours = torch.autograd.grad(_loss(out, t), list(net.parameters()))
    params = dict(net.named_parameters())
    names = list(params)
    out, t = torch.func.jvp(lambda *ps: torch.func.functional_call(net, dict(zip(names, ps)), (x,)),
                            tuple(params.values()), tuple(tangents[n] for n in names))
    ref = torch.autograd.grad(_loss(out, t), list(net.parameters()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_nested_jvp_with_a_loss_over_its_result():
    x = torch.randn(3, dtype=D, requires_grad=True)
    u, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)

    def inner(y):
        return torch_fwd.jvp(lambda z: (z.sin() * W[0]).sum(), (y,), (v,), path="eager")[1]
    d2 = torch_fwd.jvp(inner, (x,), (u,), path="eager")[1]
    ours = torch.autograd.grad(d2, [x, W])

    def inner_ref(y):
        return torch.func.jvp(lambda z: (z.sin() * W[0]).sum(), (y,), (v,))[1]
    ref = torch.autograd.grad(torch.func.jvp(inner_ref, (x,), (u,))[1], [x, W])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_compiled_regions_and_eager_code_between_them_back_propagate():
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    v = torch.randn(4, 3, dtype=D)

    def f(a):
        h = NET[0](a)
        torch._dynamo.graph_break()
        return NET[2](NET[1](h)) * B
    grads = []
    for jvp in (lambda *a: torch_fwd.jvp(*a, compile=True), torch.func.jvp):
        out, t = jvp(f, (x,), (v,))
        grads.append(torch.autograd.grad(_loss(out, t), [x, B, *NET.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_no_history_under_no_grad():
    x = torch.randn(3, 3, dtype=D, requires_grad=True)
    with torch.no_grad():
        out, t = torch_fwd.jvp(_graph_break(mlp), (x,), (torch.randn(3, 3, dtype=D),))
    assert out.grad_fn is None and t.grad_fn is None and not t.requires_grad


@torch.library.custom_op("torch_fwd_test::sinh_with_backward", mutates_args=())
def _sinh(x: torch.Tensor) -> torch.Tensor:
    return torch.sinh(x)


@_sinh.register_fake
def _(x):
    return torch.empty_like(x)


def _sinh_backward(ctx, grad):
    return grad * torch.cosh(ctx.saved_tensors[0])


_sinh.register_autograd(_sinh_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


def test_an_op_with_only_a_backward_back_propagates():
    # no rule: its tangent comes from the double-vjp identity, kept differentiable
    x = torch.randn(4, dtype=D, requires_grad=True)
    v = torch.randn(4, dtype=D, requires_grad=True)
    out, t = torch_fwd.jvp(lambda a: _sinh(a) * B[0], (x,), (v,), path="eager")
    ours = torch.autograd.grad(_loss(out, t), [x, v, B])
    out, t = torch.sinh(x) * B[0], torch.cosh(x) * v * B[0]
    ref = torch.autograd.grad(_loss(out, t), [x, v, B])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


class _Cube(torch.autograd.Function):
    """x ** 3 with a backward of its own (no jvp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class _Dropout(torch.autograd.Function):
    """A random mask drawn in forward (no jvp): primal and tangent must share it."""

    @staticmethod
    def forward(ctx, x):
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        return g * ctx.saved_tensors[0]


def test_an_autograd_function_keeps_the_history_around_it():
    # its backward attaches to the values the eager path records (before, it attached to
    # the Dual wrappers, and the parameters before the Function got no gradient)
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    v = torch.randn(4, 3, dtype=D)
    out, t = torch_fwd.jvp(_graph_break(lambda a: _Cube.apply(NET(a))), (x,), (v,), path="eager")
    assert torch_fwd.explain().startswith("eager")
    ours = torch.autograd.grad(_loss(out, t), [x, *NET.parameters()])
    ref = torch.autograd.grad(_loss(*torch.func.jvp(lambda a: NET(a) ** 3, (x,), (v,))), [x, *NET.parameters()])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_an_autograd_function_draws_one_mask_for_value_and_tangent():
    x = torch.rand(64, dtype=D, requires_grad=True) + 1
    v = torch.rand(64, dtype=D) + 1
    out, t = torch_fwd.jvp(lambda a: _Dropout.apply(a * 1), (x,), (v,), path="eager")
    torch.testing.assert_close((out / x).detach(), t / v)
    (g,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(g, (out / x).detach())
