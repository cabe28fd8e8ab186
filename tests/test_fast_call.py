"""The graph path's per-call shortcuts: dynamo's cache hit checked and run without
dynamo's frame machinery (capture._DirectCall), and JVP graphs run through PyTorch's
Python bindings (bindings.py). Neither may change a result: every guard dynamo would
check still decides, and a binding replaces an op only where it dispatches the very
same overload."""
import pytest
import torch
import torch.fx as fx

import torch_fwd
from torch_fwd import api, bindings
from torch_fwd.capture import _DirectCall

D = torch.float64
aten = torch.ops.aten


def rand(*s, dtype=D):
    return torch.randn(*s, dtype=dtype)


class _Counting:
    """Stands in for a capture's torch.compile'd function and counts calls into dynamo."""

    def __init__(self, compiled):
        self.compiled, self.calls = compiled, 0

    def __call__(self, *args):
        self.calls += 1
        return self.compiled(*args)


def _count_dynamo_calls(func):
    cap = api._capture_for(func)
    counter = cap.compiled = _Counting(cap.compiled)
    return counter


def test_later_calls_skip_dynamo_and_see_new_values():
    w = rand(4)

    def f(x):
        return torch.sin(x) * w
    counter = _count_dynamo_calls(f)
    x, v = rand(4), rand(4)
    for _ in range(3):
        x, v = rand(4), rand(4)
        w.mul_(1.5)  # in place: the same tensor, new values, no guard fails
        out, t = torch_fwd.jvp(f, (x,), (v,))
        torch.testing.assert_close(out, torch.sin(x) * w)
        torch.testing.assert_close(t, torch.cos(x) * v * w)
        assert torch_fwd.explain() == "graph"
    assert counter.calls == 1
    # (the capture compiled with dynamo's profiler bookkeeping off; the setting is restored)
    assert torch._dynamo.config.record_runtime_overhead
    # K = 3 directions, one zero: the same capture, a new JVP graph
    V = torch.stack([rand(4), torch.zeros(4, dtype=D), rand(4)])
    _, T = torch_fwd.jvp(f, (x,), (V,), chunked=True)
    torch.testing.assert_close(T, torch.cos(x) * V * w)
    assert counter.calls == 1


def test_failing_guards_go_back_to_dynamo():
    scale = [2.0]
    w = rand(3)

    def f(x):
        return torch.sin(x * scale[0]) * w
    counter = _count_dynamo_calls(f)
    x, v = rand(3), rand(3)
    torch_fwd.jvp(f, (x,), (v,))
    torch_fwd.jvp(f, (x,), (v,))
    assert counter.calls == 1
    cases = [
        lambda: None,                                    # shape of the argument
        lambda: scale.__setitem__(0, 5.0),               # a Python value the trace read
    ]
    for change, shape in zip(cases, [(2, 3), (3,)]):
        change()
        x, v = rand(*shape), rand(*shape)
        _, t = torch_fwd.jvp(f, (x,), (v,))
        s = scale[0]
        torch.testing.assert_close(t, torch.cos(x * s) * s * v * w)
    assert counter.calls == 3
    x32, v32 = x.float(), v.float()  # the argument's dtype
    _, t = torch_fwd.jvp(f, (x32,), (v32,))
    torch.testing.assert_close(t, torch.cos(x32 * 5.0) * 5.0 * v32 * w)
    assert counter.calls == 4


def test_grad_mode_and_requires_grad_are_guarded():
    w = rand(3)

    def f(x):
        return torch.tanh(x) * w
    x, v = rand(3), rand(3)
    torch_fwd.jvp(f, (x,), (v,))
    torch_fwd.jvp(f, (x,), (v,))
    xr = x.clone().requires_grad_()
    _, t = torch_fwd.jvp(f, (xr,), (v,))
    assert t.requires_grad
    t.sum().backward()
    torch.testing.assert_close(xr.grad, (-2 * torch.tanh(x) * (1 - torch.tanh(x) ** 2)) * v * w)
    with torch.no_grad():
        _, t = torch_fwd.jvp(f, (xr,), (v,))
    assert not t.requires_grad
    torch.testing.assert_close(t, (1 - torch.tanh(x) ** 2) * v * w)


def test_closure_cells_are_read_on_every_call():
    def make(w):
        def f(x):
            return x * w
        return f
    f, g = make(rand(3)), make(rand(3))  # one code object, two closures
    x, v = rand(3), rand(3)
    for _ in range(2):
        for h in (f, g):
            _, t = torch_fwd.jvp(h, (x,), (v,))
            torch.testing.assert_close(t, v * h.__closure__[0].cell_contents)

    w = rand(3)

    def k(x):
        return x * w
    torch_fwd.jvp(k, (x,), (v,))
    for new in (rand(3), rand(2, 3)):  # rebinding: same shape, then a guard that fails
        w = new
        _, t = torch_fwd.jvp(k, (x,), (v,))
        torch.testing.assert_close(t, v * w)


def test_a_replaced_code_object_is_not_served_the_old_graph():
    def f(x):
        return x * 2

    def g(x):
        return x * 3
    x, v = rand(3), rand(3)
    torch_fwd.jvp(f, (x,), (v,))
    torch_fwd.jvp(f, (x,), (v,))
    f.__code__ = g.__code__
    _, t = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, 3 * v)


def test_dynamo_reset_leaves_nothing_stale():
    def f(x):
        return torch.exp(x).sum()
    counter = _count_dynamo_calls(f)
    x, v = rand(3), rand(3)
    torch_fwd.jvp(f, (x,), (v,))
    torch._dynamo.reset()
    _, t = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, (torch.exp(x) * v).sum())
    assert counter.calls == 2


def test_entries_of_other_backends_are_not_used():
    def f(x):
        return torch.cos(x) * 2
    x, v = rand(3), rand(3)
    torch.compile(f, backend="eager")(x)  # an entry for f's code made by another backend
    counter = _count_dynamo_calls(f)
    for _ in range(3):
        out, t = torch_fwd.jvp(f, (x,), (v,))
        torch.testing.assert_close(t, -torch.sin(x) * 2 * v)
        assert torch_fwd.explain() == "graph"
    assert counter.calls == 1  # our entry, once made, is served directly beside the other
    torch.testing.assert_close(torch.compile(f, backend="eager")(x), out)


def _varargs(*xs):
    return xs[0] * 3


class _Callable:
    def __call__(self, x):
        return x * 4


@pytest.mark.parametrize("func, factor", [(_varargs, 3.0), (_Callable(), 4.0), (lambda x, *, s=5.0: x * s, 5.0)])
def test_functions_it_does_not_serve_still_work(func, factor):
    assert _DirectCall.for_function(func) is None
    x, v = rand(3), rand(3)
    for _ in range(2):
        _, t = torch_fwd.jvp(func, (x,), (v,))
        torch.testing.assert_close(t, v * factor)


def test_parameters_left_to_their_defaults_are_served_and_guarded():
    def f(x, s=2.0, w=None):
        return x * s if w is None else x * s * w
    counter = _count_dynamo_calls(f)
    x, v = rand(3), rand(3)
    for _ in range(3):
        _, t = torch_fwd.jvp(f, (x,), (v,))
        torch.testing.assert_close(t, v * 2.0)
    assert counter.calls == 1
    # a default reassigned: another function to the capture cache (its key holds the
    # defaults), captured anew
    f.__defaults__ = (3.0, None)
    counter = _count_dynamo_calls(f)
    _, t = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, v * 3.0)
    assert counter.calls == 1
    # the parameter given as a primal: dynamo compiles for it; leaving it out again is served
    s_, vs = rand(3), rand(3)
    _, t = torch_fwd.jvp(f, (x, s_), (v, vs))
    torch.testing.assert_close(t, v * s_ + x * vs)
    assert counter.calls == 2
    _, t = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, v * 3.0)
    assert counter.calls == 2


# ---- bindings ----------------------------------------------------------------------------------

def _graph(build):
    """An ATen graph made by make_fx over fake tensors (nodes carry their 'val')."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    mode = FakeTensorMode()
    with mode:
        return make_fx(build)(torch.empty(2, 3, dtype=D))


def test_bindings_replace_only_the_same_overload():
    def build(x):
        a = aten.sum.dim_IntList(x, [1])           # torch.sum(x, [1]) dispatches it
        b = aten.permute.default(x, [1, 0])
        c = aten.view.default(x, [6])              # a Tensor method
        d = aten.mul.Scalar(x, 2.0)                # torch.mul(x, 2.0) would run mul.Tensor
        e = aten.add.Tensor(x, 3.0)                # torch.add(x, 3.0): add.Tensor, the scalar wrapped
        return a, c, d, e
    gm = _graph(build)
    fast = bindings.executable(gm)
    targets = {n.name: n.target for n in fast.graph.nodes if n.op == "call_function"}
    assert targets["sum_1"] is torch.sum
    assert targets["permute"] is torch.permute
    assert targets["view"] is torch._C.TensorBase.view
    assert targets["mul"] is aten.mul.Scalar
    assert targets["add"] is torch.add
    x = rand(2, 3)
    for got, want in zip(bindings.runner(gm)(x), gm(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_torch_function_mode_is_applied_once():
    from torch.overrides import TorchFunctionMode

    class Doubling(TorchFunctionMode):
        """Doubles every sin: the result tells how many times the mode ran on it."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out * 2 if func in (torch.sin, aten.sin.default) else out

    def f(x):
        return torch.sin(x) + x
    x, v = rand(3), rand(3)
    for path, compile in [("graph", False), ("eager", False), ("auto", True)]:
        for _ in range(2):
            with Doubling():
                out, t = torch_fwd.jvp(f, (x,), (v,), path=path, compile=compile)
            torch.testing.assert_close(out, 2 * torch.sin(x) + x)
            torch.testing.assert_close(t, 2 * torch.cos(x) * v + v)
            with Doubling():
                T = torch_fwd.jvp(f, (x,), (torch.stack([v, 0 * v]),), chunked=True, path=path, compile=compile)[1]
            torch.testing.assert_close(T, torch.stack([t, 0 * t]))


def test_the_graph_path_runs_bindings():
    def f(W, x):
        return torch.relu(W @ x).sum()
    W, x = rand(4, 3), rand(3)
    vW, vx = rand(4, 3), rand(3)
    _, t = torch_fwd.jvp(f, (W, x), (vW, vx))
    _, t2 = torch_fwd.jvp(f, (W, x), (vW, vx))
    torch.testing.assert_close(t2, torch.func.jvp(f, (W, x), (vW, vx))[1])
    jg = torch_fwd.make_jvp_graph(f, W, x)
    fast = bindings.executable(jg)
    kinds = [isinstance(n.target, torch._ops.OpOverload) for n in fast.graph.nodes if n.op == "call_function"]
    assert kinds.count(False) >= len(kinds) // 2, fast.code
    assert isinstance(fast, fx.GraphModule)


# ---- one direction without its K (transform.unbatched_tangents, transform.drop_unit_k) ------

def _unit_k_views(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (aten.unsqueeze.default, aten.select.int, aten.squeeze.dim)]


def test_one_direction_runs_without_the_views_of_its_k():
    from torch.utils import _pytree as pytree
    from torch_fwd.transform import drop_unit_k, unbatched_tangents

    def f(W1, W2, x):
        return torch.relu(W2 @ torch.relu(W1 @ x)).sum()
    primals = (rand(6, 4), rand(3, 6), rand(4, 2))
    tangents = tuple(rand(*p.shape) for p in primals)
    jg, _, _ = api.trace_jvp_graph(f, list(primals), pytree.tree_flatten(primals)[1], 1, for_autograd=False)
    assert _unit_k_views(jg.gm)  # the products' rules select and unsqueeze the K = 1
    jg = drop_unit_k(unbatched_tangents(jg))
    assert not _unit_k_views(jg.gm), jg.gm.code
    outs, touts, _ = jg(list(primals), list(tangents))
    ref, tref = torch.func.jvp(f, primals, tangents)
    torch.testing.assert_close(outs[0], ref)
    torch.testing.assert_close(touts[0], tref)
    # and through jvp, twice (the second call runs the cached graph)
    for _ in range(2):
        torch.testing.assert_close(torch_fwd.jvp(f, primals, tangents)[1], tref)


def _graph_of(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch_fwd.transform import JVPGraph
    gm = make_fx(fn, tracing_mode="fake")(*args)
    return JVPGraph(gm, (True,) * len(args), (True,), ())


@pytest.mark.parametrize("name, fn, shapes, moved", [
    # a pointwise op whose other operand broadcasts from the right: K moves below it
    ("mul_then_select", lambda y, w: (y.unsqueeze(0) * w).select(0, 0), [(3, 4), (4,)], True),
    ("sum_then_squeeze", lambda y: y.unsqueeze(0).sum([1, 2]).squeeze(0), [(3, 4)], True),
    # a sum over the K dimension itself, an operand as long as the result: nothing moves
    ("sum_over_k", lambda y: y.unsqueeze(0).sum([0, 1]), [(3, 4)], False),
    ("operand_with_a_leading_dim", lambda y, z: y.unsqueeze(0) * z, [(3, 4), (2, 3, 4)], False),
    # a 0-d float32 y, unsqueezed, keeps its dtype against a 0-d float64; left 0-d it would not
    ("a_scalar_keeps_its_promotion", lambda y, z: y.float().unsqueeze(0) * z, [(), ()], False),
])
def test_drop_unit_k_moves_only_what_is_exact(name, fn, shapes, moved):
    from torch_fwd.transform import drop_unit_k
    args = [torch.randn(s, dtype=D) for s in shapes]
    jg = drop_unit_k(_graph_of(fn, *args))
    assert (not _unit_k_views(jg.gm)) == moved, jg.gm.code
    out = jg.gm(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, fn(*args))
    assert out.shape == fn(*args).shape
