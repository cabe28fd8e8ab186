"""The torch.compile backend "torch_fwd" (torch_fwd/backend.py): its results against the eager
path, torch.func.jvp and finite differences, with and without graph breaks, K = 1 and K > 1,
guards, the known traps, and the conveniences (jvp(compile=...), JVP(module, compile=True)).

Each test compiles (Inductor, seconds per graph on these CPUs): functions are small and
shared between tests where a recompile is not what is tested.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_fwd
from torch_fwd import Dual
from torch_fwd.backend import compiled_regions, reset_regions, stats

D = torch.float64


def rand(*s, dtype=D):
    return torch.randn(*s, dtype=dtype)


def fd(f, primals, tangents, eps=1e-6):
    """Central difference of f along the tangents (float64)."""
    plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
    minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
    return (plus - minus) / (2 * eps)


def smooth(x, w):
    y = torch.sin(x) * w[0] + x.exp() * 0.1
    return torch.tanh(y @ w).sum(-1)


def broken(x, w):
    y = torch.sin(x) * w[0] + x.exp() * 0.1
    torch._dynamo.graph_break()
    return torch.tanh(y @ w).sum(-1)


@pytest.mark.parametrize("f", [smooth, broken], ids=["one_graph", "graph_break"])
def test_equals_eager_path_torch_func_and_differences(f):
    torch.manual_seed(0)
    x, w = rand(5, 3), rand(3, 3)
    vx, vw = rand(5, 3), rand(3, 3)
    out, t = torch_fwd.jvp(f, (x, w), (vx, vw), compile=True)
    assert torch_fwd.explain().startswith("compiled (" + ("1 region" if f is smooth else "2 regions"))
    eout, et = torch_fwd.jvp(f, (x, w), (vx, vw), path="eager")
    torch.testing.assert_close(out, eout)
    torch.testing.assert_close(t, et)
    torch.testing.assert_close(t, torch.func.jvp(smooth, (x, w), (vx, vw))[1])
    torch.testing.assert_close(t, fd(smooth, (x, w), (vx, vw)), rtol=1e-6, atol=1e-6)
    # K = 3 directions, one of them zero, w's tangents all zero (the same guards: K changes)
    V = torch.stack([rand(5, 3), torch.zeros(5, 3, dtype=D), rand(5, 3)])
    out, T = torch_fwd.jvp(f, (x, w), (V, torch.zeros(3, 3, 3, dtype=D)), chunked=True, compile=True)
    assert torch_fwd.explain().startswith("compiled")
    for k in range(3):
        torch.testing.assert_close(T[k], torch.func.jvp(smooth, (x, w), (V[k], torch.zeros_like(w)))[1])
    assert T[1].abs().max() == 0
    # the primal function, compiled by the same backend, on ordinary tensors
    cf = torch.compile(f, backend="torch_fwd")
    torch.testing.assert_close(cf(x, w), smooth(x, w))


def test_dual_inputs_and_guards_on_tangent_presence_K_shape_dtype():
    def f(x, y):
        return (x * y.cos()).exp()

    cf = torch.compile(f, backend="torch_fwd")

    def check(x, tx, y, ty):
        reset_regions()
        out = cf(Dual(x, tx), Dual(y, ty) if ty is not None else y)
        n, eager = compiled_regions()
        assert isinstance(out, Dual) and n == 1 and not eager
        ref = torch_fwd.jvp(f, (x, y), (tx[0] if tx.shape[0] == 1 else tx,
                                         torch.zeros_like(y) if ty is None else (ty[0] if ty.shape[0] == 1 else ty)),
                            path="eager", chunked=tx.shape[0] > 1)[1]
        torch.testing.assert_close(out.primal, f(x, y))
        torch.testing.assert_close(out.tangent, ref if tx.shape[0] > 1 else ref[None])

    x, y = rand(4), rand(4)
    check(x, rand(1, 4), y, rand(1, 4))     # both tangents
    check(x, rand(1, 4), y, None)           # y without tangent
    check(x, rand(3, 4), y, rand(3, 4))     # K = 3
    check(rand(2, 4), rand(1, 2, 4), rand(2, 4), rand(1, 2, 4))  # a new shape
    x32, y32 = rand(4, dtype=torch.float32), rand(4, dtype=torch.float32)
    check(x32, rand(1, 4, dtype=torch.float32), y32, rand(1, 4, dtype=torch.float32))  # a new dtype


def test_input_mutation_in_the_compiled_region_carries_its_tangent():
    def f(x, buf):
        buf.mul_(x.sin())
        return buf.sum()

    x, b, vx, vb = rand(4), rand(4), rand(4), rand(4)
    b1, b2 = b.clone(), b.clone()
    out, t = torch_fwd.jvp(f, (x, b1), (vx, vb), compile=True)
    assert torch_fwd.explain().startswith("compiled")
    eout, et = torch_fwd.jvp(f, (x, b2), (vx, vb), path="eager")
    torch.testing.assert_close(t, et)
    torch.testing.assert_close(b1, b2)  # the input was updated as the primal would update it
    torch.testing.assert_close(vb, vb.clone())


def test_layer_norm_with_captured_weight_and_bias():
    # torch.compile(torch.func.jvp) hits an internal assertion on this function
    torch.manual_seed(1)
    weight, bias = rand(8), rand(8)

    def f(x):
        return F.layer_norm(x, (8,), weight, bias).tanh()

    x, v = rand(3, 8), rand(3, 8)
    _, t = torch_fwd.jvp(f, (x,), (v,), compile=True)
    assert torch_fwd.explain().startswith("compiled")
    torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])
    torch.testing.assert_close(t, fd(f, (x,), (v,)), rtol=1e-6, atol=1e-6)


# a custom op with a user frule, and an autograd.Function with a jvp (round forward, identity
# jvp: differentiating its forward would give zero), as the user-rule tests define them
from test_user_rules import StraightThrough, cube  # noqa: E402


def test_user_rule_and_autograd_function_jvp_inside_the_compiled_region():
    x, v = rand(4), rand(2, 4)
    # a custom op with a user frule (no autograd formula: nothing to trace around)
    _, t = torch_fwd.jvp(lambda x: cube(x.sin()) * 2, (x,), (v,), chunked=True, compile=True)
    assert torch_fwd.explain() == "compiled (1 region)"
    torch.testing.assert_close(t, 2 * 3 * x.sin() ** 2 * x.cos() * v)
    # an autograd.Function with a jvp: its frame runs eagerly, through Function.apply
    _, t = torch_fwd.jvp(lambda x: StraightThrough.apply(x * 3) * 2, (x,), (v,), chunked=True, compile=True)
    torch.testing.assert_close(t, 6 * v)
    assert "StraightThrough" in torch_fwd.explain()


def _refuse_jvp_graphs(monkeypatch, via_compile_fx=True):
    """Make Inductor fail on JVP graphs (those with (2, 4) tangents) compiled directly
    (backend.inductor_directly) and, with ``via_compile_fx``, through compile_fx too."""
    import torch._inductor.compile_fx as cfx
    from torch_fwd import backend

    def refusing(real):
        def refuse(gm, example_inputs, *a, **kw):
            if any(t.shape == (2, 4) for t in example_inputs):
                raise RuntimeError("refused on purpose")
            return real(gm, example_inputs, *a, **kw)
        return refuse
    monkeypatch.setattr(backend, "inductor_directly", refusing(backend.inductor_directly))
    if via_compile_fx:
        monkeypatch.setattr(cfx, "compile_fx", refusing(cfx.compile_fx))


def test_a_jvp_graph_goes_to_inductor_directly_and_through_compile_fx_where_that_fails(monkeypatch, caplog):
    from torch_fwd import backend
    from torch_fwd.backend import stats
    monkeypatch.setattr(backend, "_direct_failures_seen", set())

    def f(x):
        return x.sin() * x.softmax(0)  # (softmax: an op Inductor's decompositions rewrite)

    x, v = rand(4), rand(2, 4)
    ref = torch.func.jvp(f, (x,), (v[1],))[1]
    before = dict(stats)
    _, t = torch_fwd.jvp(f, (x,), (v,), chunked=True, compile=True)
    assert torch_fwd.explain() == "compiled (1 region)"
    assert stats["jvp_graphs_compiled_directly"] == before["jvp_graphs_compiled_directly"] + 1
    torch.testing.assert_close(t[1], ref)
    # the direct step failing: compile_fx compiles the graph, still one region
    _refuse_jvp_graphs(monkeypatch, via_compile_fx=False)
    for shift in (1, 2):
        g = lambda x: f(x) + shift  # noqa: E731 (a new function: a new capture)
        before = dict(stats)
        _, t = torch_fwd.jvp(g, (x,), (v,), chunked=True, compile=True)
        assert torch_fwd.explain() == "compiled (1 region)"
        assert stats["jvp_graphs_compiled"] == before["jvp_graphs_compiled"] + 1
        assert stats["jvp_graphs_compiled_directly"] == before["jvp_graphs_compiled_directly"]
        torch.testing.assert_close(t[1], ref)
    # the same failure is a warning once (then a debug line): a torch whose Inductor API
    # differs fails every graph alike
    warned = [r for r in caplog.records if "direct compile failed" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warned) == 1 and "refused on purpose" in warned[0].getMessage()


def test_compiled_outputs_that_alias_inputs_or_are_transposed_keep_the_primals_layout():
    # (the direct compile has no aot_autograd runtime wrapper regenerating aliases)
    def f(x, y):
        return x.t(), (x * y).t(), y[1:].sin(), x

    x, y, vx, vy = rand(3, 4), rand(3, 4), rand(3, 4), rand(3, 4)
    out, t = torch_fwd.jvp(f, (x, y), (vx, vy), compile=True)
    assert torch_fwd.explain() == "compiled (1 region)"
    eout, et = torch_fwd.jvp(f, (x, y), (vx, vy), path="eager")
    for o, e in zip(out + t, eout + et):
        torch.testing.assert_close(o, e)
        assert o.stride() == e.stride()
    assert out[0].data_ptr() == x.data_ptr()  # x.t() is a view of x, as it is uncompiled


def test_one_direction_reaches_the_compiled_graph_without_its_K(monkeypatch):
    """Without chunked, the compiled JVP graph takes each tangent as given and gives the
    output's tangent in the output's shape: K = 1 is added and removed inside the graph,
    where Inductor makes both free, not by views around every call. Chunked with K = 1,
    the same function gets a graph of its own, with the K."""
    import torch_fwd.backend as backend
    seen = []
    real = backend.inductor_directly

    def spy(gm, examples, patches):
        seen.append([tuple(e.shape) for e in examples])
        return real(gm, examples, patches)
    monkeypatch.setattr(backend, "inductor_directly", spy)

    def f(x, w):
        return (torch.sin(x) @ w).relu() * x.sum()

    x, w, vx, vw = rand(5, 3), rand(3, 2), rand(5, 3), rand(3, 2)
    ref = torch.func.jvp(f, (x, w), (vx, vw))[1]
    out, t = torch_fwd.jvp(f, (x, w), (vx, vw), compile=True)
    assert torch_fwd.explain() == "compiled (1 region)"
    assert seen == [[(5, 3), (3, 2), (5, 3), (3, 2)]]
    assert t.shape == (5, 2) and not t._is_view()
    torch.testing.assert_close(t, ref)
    torch.testing.assert_close(t, fd(f, (x, w), (vx, vw)), rtol=1e-6, atol=1e-6)
    # served again, and with w's tangent zero
    torch.testing.assert_close(torch_fwd.jvp(f, (x, w), (vx, vw), compile=True)[1], ref)
    t0 = torch_fwd.jvp(f, (x, w), (vx, torch.zeros_like(vw)), compile=True)[1]
    torch.testing.assert_close(t0, torch.func.jvp(f, (x, w), (vx, torch.zeros_like(vw)))[1])
    out, T = torch_fwd.jvp(f, (x, w), (vx[None], vw[None]), chunked=True, compile=True)
    assert seen[-1] == [(5, 3), (3, 2), (1, 5, 3), (1, 3, 2)]
    torch.testing.assert_close(T, ref[None])


def test_a_region_that_cannot_be_compiled_runs_eagerly_and_says_so(monkeypatch):
    _refuse_jvp_graphs(monkeypatch)

    def f(x):
        return x.sin() * x

    x, v = rand(4), rand(2, 4)
    _, t = torch_fwd.jvp(f, (x,), (v,), chunked=True, compile=True)
    why = torch_fwd.explain()
    assert "ran eagerly" in why or why.startswith("eager"), why
    assert "refused on purpose" in why
    torch.testing.assert_close(t, (x.cos() * x + x.sin()) * v)


def test_a_buffer_filled_after_a_graph_break_is_a_clear_error():
    def f(x):
        buf = torch.zeros(3, dtype=x.dtype)
        torch._dynamo.graph_break()
        buf[0] = x[0].sin()
        return buf.exp()

    x, v = rand(3), rand(3)
    with pytest.raises(RuntimeError, match="(?s)could not be captured with its tangents.*Run with compile=False"):
        torch_fwd.jvp(f, (x,), (v,), compile=True)
    _, t = torch_fwd.jvp(f, (x,), (v,))  # the eager path tracks the write
    torch.testing.assert_close(t, torch.tensor([x[0].cos() * v[0], 0, 0], dtype=D) * f(x))


def test_full_collections_wait_while_a_jvp_graph_is_built_and_compiled(monkeypatch):
    """Both ways to a compiled JVP graph (jvp(compile=True)'s capture, and the backend
    called on Duals) build and compile it with CPython's generation-2 threshold raised,
    and give the threshold back after, also where the compile fails."""
    import gc
    from torch_fwd import backend
    seen = []
    real = backend.inductor_directly

    def spy(gm, examples, patches):
        seen.append(gc.get_threshold())
        return real(gm, examples, patches)
    monkeypatch.setattr(backend, "inductor_directly", spy)
    before = gc.get_threshold()
    x, v = rand(4), rand(4)
    _, t = torch_fwd.jvp(lambda x: x.sin() * 3.0, (x,), (v,), compile=True)
    torch.testing.assert_close(t, x.cos() * 3.0 * v)
    g = torch.compile(lambda x: x.sin() * 5.0, backend="torch_fwd")
    y = g(Dual(x, v[None]))
    torch.testing.assert_close(y.tangent[0], x.cos() * 5.0 * v)
    assert len(seen) == 2
    assert all(s[:2] == before[:2] and s[2] == backend.deferred_full_collections.HELD_THRESHOLD for s in seen)
    assert gc.get_threshold() == before
    _refuse_jvp_graphs(monkeypatch)
    _, t = torch_fwd.jvp(lambda x: x.sin() * 7.0, (x,), (v[None].expand(2, 4),), chunked=True, compile=True)
    assert "refused on purpose" in torch_fwd.explain()
    assert gc.get_threshold() == before


def test_deferred_full_collections_nest_and_restore(monkeypatch):
    import gc
    from torch_fwd.backend import _DeferredFullCollections
    defer = _DeferredFullCollections()
    held = defer.HELD_THRESHOLD
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with defer():
            assert gc.get_threshold() == (700, 10, held)
            with pytest.raises(ValueError):
                with defer():
                    raise ValueError
            assert gc.get_threshold() == (700, 10, held)  # the outer one still holds it
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(0, 10, 10)  # collection off by threshold: left off
        with defer():
            assert gc.get_threshold() == (0, 10, 10)
        assert gc.get_threshold() == (0, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_jvp_inductor_settings_drop_only_options_this_inductor_lacks():
    # (jvp_inductor_settings drops an option an older or newer Inductor lacks -- torch 2.12
    # has no realize_cpu_opcount_threshold -- and never one it has: a setting documented in
    # backend.py would silently not apply)
    import torch._inductor.config as inductor_config
    from torch_fwd import backend
    kept = backend.jvp_inductor_settings()
    assert kept == {k: v for k, v in backend.JVP_INDUCTOR_SETTINGS.items() if hasattr(inductor_config, k)}
    if torch.__version__ >= "2.13":
        assert kept == backend.JVP_INDUCTOR_SETTINGS


def test_long_elementwise_chain_compiles_in_under_a_minute():
    import time
    from benchmarks.cases import large_single_block
    x, v = torch.rand(64, dtype=D) * 0.5 + 0.5, rand(64)
    t0 = time.perf_counter()
    _, t = torch_fwd.jvp(large_single_block, (x,), (v,), compile=True)
    assert time.perf_counter() - t0 < 60
    assert torch_fwd.explain() == "compiled (1 region)"
    torch.testing.assert_close(t, torch.func.jvp(large_single_block, (x,), (v,))[1])


def test_transformer_block_with_default_attention_K1_and_K2():
    from examples.models import transformer_block
    torch.manual_seed(0)
    block = transformer_block(32, 4)
    x = torch.randn(2, 8, 32)
    v, V = torch.randn_like(x), torch.randn(2, 2, 8, 32)
    with torch.no_grad():
        out, t = torch_fwd.jvp(block, (x,), (v,), compile=True)
        assert torch_fwd.explain().startswith("compiled")
        _, T = torch_fwd.jvp(block, (x,), (V,), chunked=True, compile=True)
        eout, et = torch_fwd.jvp(block, (x,), (v,), path="eager")
        _, eT = torch_fwd.jvp(block, (x,), (V,), chunked=True, path="eager")
    torch.testing.assert_close(out, eout, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t, et, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(T, eT, rtol=1e-4, atol=1e-4)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch.testing.assert_close(t, torch.func.jvp(block, (x,), (v,))[1], rtol=1e-4, atol=1e-4)


def test_JVP_module_compile_reuses_its_compiled_graph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)).double()
    jm = torch_fwd.JVP(m, compile=True)
    x = rand(4, 6)
    for i in range(3):
        if i == 1:
            compiled_before = stats["jvp_graphs_compiled"]
        v = rand(4, 6)
        out, t = jm(x, tangents=(v,))
        assert torch_fwd.explain() == "compiled (1 region)"
        torch.testing.assert_close(t, torch.func.jvp(m, (x,), (v,))[1])
        torch.testing.assert_close(out, m(x))
    # compiled once: the later calls hit dynamo's cache and the backend's
    assert stats["jvp_graphs_compiled"] == compiled_before


def test_fullgraph_is_honoured_and_mode_passed_through():
    x, v = rand(4), rand(4)
    with pytest.raises(Exception, match="graph_break|graph break|Graph break"):
        torch_fwd.jvp(broken, (x, rand(4, 4)), (v, rand(4, 4)), compile={"fullgraph": True})
    # reduce-overhead: CUDA graphs on a GPU (arranged by compile_fx, so its JVP graph does not
    # go to Inductor directly); on a CPU Inductor runs without them
    from torch_fwd.backend import stats
    before = dict(stats)
    _, t = torch_fwd.jvp(lambda x: x.sin() * 2, (x,), (v,), compile={"fullgraph": True, "mode": "reduce-overhead"})
    torch.testing.assert_close(t, 2 * x.cos() * v)
    assert stats["jvp_graphs_compiled"] == before["jvp_graphs_compiled"] + 1
    assert stats["jvp_graphs_compiled_directly"] == before["jvp_graphs_compiled_directly"]
    with pytest.raises(ValueError, match="compile takes"):
        torch_fwd.jvp(lambda x: x, (x,), (v,), compile={"full_graph": True})
    with pytest.raises(TypeError, match="compile must be"):
        torch_fwd.jvp(lambda x: x, (x,), (v,), compile="yes")


def test_jvp_of_a_torch_compiled_function_compiles_its_tangents():
    def f(x):
        return x.sin().exp()

    cf = torch.compile(f)  # Inductor, as a user would have it
    x, v = rand(4), rand(4)
    _, t = torch_fwd.jvp(cf, (x,), (v,))
    assert torch_fwd.explain().startswith("compiled")
    torch.testing.assert_close(t, f(x) * x.cos() * v)


def test_backprop_through_the_compiled_tangent():
    torch.manual_seed(0)
    w = rand(3, 3).requires_grad_()

    def f(x):
        return torch.tanh(x @ w).sum(-1)

    x, v = rand(4, 3), rand(4, 3)
    from torch_fwd.backend import stats
    before = dict(stats)
    _, t = torch_fwd.jvp(f, (x,), (v,), compile=True)
    # (a graph autograd differentiates needs aot_autograd's joint graph: compile_fx, not direct)
    assert stats["jvp_graphs_compiled_directly"] == before["jvp_graphs_compiled_directly"]
    (g,) = torch.autograd.grad(t.sum(), w)
    _, t_ref = torch.func.jvp(f, (x,), (v,))
    (g_ref,) = torch.autograd.grad(t_ref.sum(), w)
    torch.testing.assert_close(g, g_ref)


def test_backend_registered_by_entry_point_in_a_fresh_interpreter():
    code = ("import sys, torch\n"
            "f = torch.compile(lambda x: x.sin() * 2, backend='torch_fwd')\n"
            "x = torch.randn(5)\n"
            "assert torch.allclose(f(x), x.sin() * 2)\n"
            "assert 'torch_fwd' in sys.modules  # loaded by the entry point, not imported by us\n"
            "from torch_fwd import Dual\n"
            "out = f(Dual(x, torch.ones(1, 5)))\n"
            "assert torch.allclose(out.tangent[0], 2 * x.cos())\n"
            "print('ok')\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_gpt2_compiled_equals_the_graph_path():
    # its attention's JVP graph holds a view of an expanded, transposed tensor that
    # Inductor's decompositions lay out differently (backend._compile)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_head=4, n_embd=64, vocab_size=100,
                                                       n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    f = lambda e: m(inputs_embeds=e).last_hidden_state  # noqa: E731
    x = torch.randn(2, 16, 64)
    V = torch.randn(2, 2, 16, 64)
    _, T = torch_fwd.jvp(f, (x,), (V,), chunked=True, compile=True)
    assert torch_fwd.explain() == "compiled (1 region)"
    _, T_ref = torch_fwd.jvp(f, (x,), (V,), chunked=True, path="graph")
    torch.testing.assert_close(T, T_ref, rtol=1e-4, atol=1e-4)


def test_jvp_graphs_for_inductor_are_traced_with_only_the_kernels_inductor_cannot_write(monkeypatch):
    from torch_fwd import backend, triton_kernels
    seen = []

    def build(*a, **kw):
        seen.append(triton_kernels.under_inductor())
        raise RuntimeError("stop after the trace")
    monkeypatch.setattr(backend, "build_jvp_graph", build)
    with pytest.raises(RuntimeError, match="stop after the trace"):
        backend.build_compiled_jvp_graph(lambda: None, (), (), (), 1, {}, grad=False)
    with pytest.raises(RuntimeError, match="stop after the trace"):
        backend.build_compiled_jvp_graph(lambda: None, (), (), (), 1, {}, grad=True)
    assert seen == [True, True] and not triton_kernels.under_inductor()
