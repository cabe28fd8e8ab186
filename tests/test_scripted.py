"""The graph path's TorchScript runner (torch_fwd/scripted.py): which graphs it takes,
that a traced graph gives the graph's own answers, and that anything doubtful keeps the
bindings runner."""
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import torch_fwd
from torch_fwd import capture, scripted


def _jvp_graphs(fn):
    """The JVP graphs the graph path holds for plain function ``fn`` (through dynamo's
    cache entries for its code: each entry's code calls its compiled graphs by name)."""
    graphs = []
    for entry in capture._cache_entries(fn.__code__):
        for name in entry.code.co_names:
            if name.startswith("__compiled_fn"):
                inner = fn.__globals__[name]
                while hasattr(inner, "__wrapped__"):
                    inner = inner.__wrapped__
                graphs += list(getattr(inner, "jvp_graphs", {}).values())
    return graphs


def _traced(fn):
    return [hasattr(g._forward, "traced") for g in _jvp_graphs(fn)]


def _mlp(w1, w2, x):
    return torch.tanh(w2 @ torch.relu(w1 @ x)).sum(0)


def test_reused_graph_runs_traced_and_agrees():
    def mlp(w1, w2, x):  # (each test its own function: dynamo's cache is per code object)
        return _mlp(w1, w2, x)

    torch.manual_seed(0)
    w1, w2, x = torch.randn(8, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), \
        torch.randn(4, 5, dtype=torch.float64)
    for k in (1, 3):
        ts = tuple(torch.randn((k,) + a.shape, dtype=a.dtype) for a in (w1, w2, x))
        first = torch_fwd.jvp(mlp, (w1, w2, x), ts, chunked=True)
        second = torch_fwd.jvp(mlp, (w1, w2, x), ts, chunked=True)    # traces, checks, keeps the trace
        ts2 = tuple(torch.randn_like(t) for t in ts)                     # new values through the trace
        third = torch_fwd.jvp(mlp, (w1, w2, x), ts2, chunked=True)
        ref = torch.stack([torch.func.jvp(mlp, (w1, w2, x), tuple(t[c] for t in ts2))[1] for c in range(k)])
        assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
        torch.testing.assert_close(third[1], ref)
    assert _traced(mlp) and all(_traced(mlp))


def test_first_call_and_short_graphs_keep_bindings():
    def short(x):
        return x.sin().sum()

    x, t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    torch_fwd.jvp(short, (x,), (t,))
    torch_fwd.jvp(short, (x,), (t,))
    torch_fwd.jvp(short, (x,), (t,))
    assert _traced(short) == [False]  # under MIN_OPS ops

    def mlp(w1, w2, x):
        return _mlp(w1, w2, x)

    w1, w2, xm = torch.randn(8, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), \
        torch.randn(4, 5, dtype=torch.float64)
    torch_fwd.jvp(mlp, (w1, w2, xm), tuple(torch.ones_like(a) for a in (w1, w2, xm)))
    assert _traced(mlp) == [False]  # a graph run once is never traced


def test_graphs_autograd_differentiates_keep_bindings():
    def mlp(w1, w2, x):
        return _mlp(w1, w2, x)

    w1 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    w2, x = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    ts = tuple(torch.randn_like(a) for a in (w1, w2, x))
    for _ in range(3):
        _, tout = torch_fwd.jvp(mlp, (w1, w2, x), ts)
        (g,) = torch.autograd.grad(tout.sum(), w1)
    assert _traced(mlp) == [False]
    ref = torch.autograd.grad(torch.func.jvp(mlp, (w1, w2, x), ts)[1].sum(), w1)[0]
    torch.testing.assert_close(g, ref)


def test_mutating_graph_not_traced_and_mutates_once():
    def f(x, buf):
        buf.mul_(2.0)
        y = x
        for _ in range(6):
            y = torch.sin(y) * 1.5 + buf
        return y

    x = torch.randn(4, dtype=torch.float64)
    buf = torch.ones(4, dtype=torch.float64)
    for i in range(3):
        torch_fwd.jvp(f, (x, buf), (torch.ones_like(x), torch.zeros_like(buf)))
        assert torch.equal(buf, torch.full((4,), 2.0 ** (i + 1), dtype=torch.float64))
    assert _traced(f) and not any(_traced(f))


def test_random_graph_not_traced():
    def f(x):
        y = F.dropout(x, 0.5, training=True)
        for _ in range(6):
            y = torch.sin(y) * 1.5
        return y

    x = torch.randn(16, dtype=torch.float64)
    for _ in range(3):
        torch.manual_seed(1)
        out, tout = torch_fwd.jvp(f, (x,), (torch.ones_like(x),))
        torch.manual_seed(1)
        assert torch.equal(out, f(x))
    assert _traced(f) and not any(_traced(f))


def _graph(fn, *args):
    return make_fx(fn)(*args)


def _chain(a):
    """MIN_OPS ops: just long enough to be traced."""
    for _ in range(scripted.MIN_OPS):
        a = a.sin()
    return (a,)


def test_traceable_rules():
    x = torch.randn(4)

    def short(a):
        return a.sin()

    def mutating(a):
        b = a.clone()
        for _ in range(scripted.MIN_OPS):
            b = b.sin()
        b.add_(1)
        return b

    def random(a):
        for _ in range(scripted.MIN_OPS):
            a = a.sin()
        return a + torch.rand(4)

    assert scripted.traceable(_graph(_chain, x))
    assert not scripted.traceable(_graph(short, x))
    assert not scripted.traceable(_graph(mutating, x))
    assert not scripted.traceable(_graph(random, x))


def test_trace_not_trusted_when_outputs_differ():
    x = torch.randn(4)
    gm = _graph(_chain, x)
    wrong = lambda *a: (gm(*a)[0] + 1,)  # noqa: E731 - a reference that disagrees
    run, res = scripted.traced_runner(gm, wrong, [x])
    assert run is None and torch.equal(res[0], _chain(x)[0] + 1)
    run, res = scripted.traced_runner(gm, gm, [x])
    assert run is not None and torch.equal(run(x)[0], _chain(x)[0])


def test_executor_optimisation_switch_restored():
    before = torch._C._get_graph_executor_optimize()
    x = torch.randn(4)
    gm = _graph(_chain, x)
    run, _ = scripted.traced_runner(gm, gm, [x])
    run(x)
    assert torch._C._get_graph_executor_optimize() == before
