"""The jvp contract: same as torch.func.jvp, plus chunked tangents, both paths."""
import pytest
import torch
import torch.nn.functional as F

import torch_fwd
from torch_fwd.testing import check_frule

D = torch.float64
PATHS = ["eager", "graph", "auto"]


def rand(*s):
    return torch.randn(*s, dtype=D)


@pytest.mark.parametrize("path", PATHS)
def test_matches_torch_func_on_pytrees(path):
    def f(d, w):
        return {"y": torch.tanh(d["a"] @ w) + d["b"].sin().sum(), "z": (d["a"] * 2,)}
    primals = ({"a": rand(3, 4), "b": rand(2)}, rand(4, 5))
    tangents = ({"a": rand(3, 4), "b": rand(2)}, rand(4, 5))
    out, t = torch_fwd.jvp(f, primals, tangents, path=path)
    ref_out, ref_t = torch.func.jvp(f, primals, tangents)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 4])
def test_chunked_equals_k_single_jvps(path, k):
    def f(x, w):
        return F.gelu(x @ w).sum(-1)
    x, w = rand(3, 4), rand(4, 2)
    vx, vw = rand(k, 3, 4), rand(k, 4, 2)
    out, t = torch_fwd.jvp(f, (x, w), (vx, vw), chunked=True, path=path)
    assert t.shape == (k, 3)
    for i in range(k):
        _, ref = torch.func.jvp(f, (x, w), (vx[i], vw[i]))
        torch.testing.assert_close(t[i], ref)


@pytest.mark.parametrize("path", PATHS)
def test_has_aux(path):
    def f(x):
        return x.exp(), {"aux": x.sum(), "n": 3}
    x, v = rand(3), rand(3)
    out, t, aux = torch_fwd.jvp(f, (x,), (v,), has_aux=True, path=path)
    torch.testing.assert_close(t, v * x.exp())
    assert aux["n"] == 3 and not isinstance(aux["aux"], torch_fwd.Dual)
    torch.testing.assert_close(aux["aux"], x.sum())


@pytest.mark.parametrize("path", PATHS)
def test_output_independent_of_input_gets_zeros(path):
    c = rand(3)
    x, v = rand(3), rand(3)
    out, t = torch_fwd.jvp(lambda x: (x * 2, c + 1, x.argmax()), (x,), (v,), path=path)
    torch.testing.assert_close(t[0], 2 * v)
    assert torch.equal(t[1], torch.zeros(3, dtype=D)) and t[2].dtype == torch.int64


def test_same_tensor_as_two_primals_keeps_both_tangents():
    x, a, b = rand(3), rand(3), rand(3)
    _, t = torch_fwd.jvp(lambda u, w: u * 2 + w.sin(), (x, x), (a, b))
    torch.testing.assert_close(t, 2 * a + x.cos() * b)


def test_identity_and_input_passthrough():
    x, v = rand(3), rand(3)
    out, t = torch_fwd.jvp(lambda x: x, (x,), (v,))
    assert out is x or torch.equal(out, x)
    torch.testing.assert_close(t, v)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("primals,tangents,exc,match", [
    ([rand(3)], [rand(3)], TypeError, "primals must be a tuple"),
    ((rand(3),), (rand(4),), ValueError, "shape"),
    ((rand(3),), (rand(3).float(),), TypeError, "dtype"),
    ((rand(3),), (torch.ones(3, dtype=torch.int64),), TypeError, "dtype"),
    ((torch.arange(3),), (torch.arange(3),), ValueError, "floating"),
    ((rand(3), rand(2)), (rand(3),), ValueError, "structure"),
    ((rand(3), 2.0), (rand(3), 1.0), TypeError, "primals must be tensors"),
    (({"a": rand(3)},), ({"b": rand(3)},), ValueError, "structure"),
])
def test_bad_input(primals, tangents, exc, match):
    with pytest.raises(exc, match=match):
        torch_fwd.jvp(lambda *a: a[0], primals, tangents)


def test_bad_chunked_input():
    x = rand(3)
    with pytest.raises(ValueError, match="K = 2"):
        torch_fwd.jvp(lambda a, b: a + b, (x, x.clone()), (rand(3, 3), rand(2, 3)), chunked=True)
    with pytest.raises(ValueError, match=r"\(K, \*"):
        torch_fwd.jvp(lambda a: a, (x,), (rand(3),), chunked=True)
    with pytest.raises(TypeError, match="callable"):
        torch_fwd.jvp(3, (x,), (x,))
    with pytest.raises(ValueError, match="path"):
        torch_fwd.jvp(torch.sin, (x,), (x,), path="fast")


@pytest.mark.parametrize("path", ["eager", "auto"])
def test_inplace_on_input_leaves_caller_tangent_alone(path):
    def f(x):
        x.mul_(2)
        return x.sin()
    x, v = rand(4), rand(4)
    x0, v0 = x.clone(), v.clone()
    out, t = torch_fwd.jvp(f, (x,), (v,), path=path)
    assert torch.equal(v, v0), "the caller's tangent was written into"
    torch.testing.assert_close(x, 2 * x0)  # the primal mutation is f's own semantics
    torch.testing.assert_close(t, torch.cos(2 * x0) * 2 * v0)


# ---- code that cannot be captured -----------------------------------------------------------

def test_data_dependent_control_flow_runs_region_by_region_and_never_specialises():
    def f(x):
        if x.sum() > 0:
            return x.sin()
        return x.cos()
    v = rand(3)
    for x in (rand(3).abs(), -rand(3).abs(), rand(3).abs()):
        _, t = torch_fwd.jvp(f, (x,), (v,))
        ref = torch.cos(x) * v if x.sum() > 0 else -torch.sin(x) * v
        torch.testing.assert_close(t, ref)
        assert torch_fwd.explain().startswith("regions")


# (Python loops over elements and writes into a buffer f allocates: tests/test_mooncake.py)


def test_write_through_one_view_seen_by_another():
    def f(x):
        buf = torch.zeros(2, 3, dtype=x.dtype)
        row = buf[1]          # a view taken before any tangent exists
        buf[1, 1:] = x        # materialises buf's tangent through another view
        return row * 3
    x = rand(2)
    check_frule(f, x, paths=("eager",))


def test_writes_through_views_of_a_transposed_buffer():
    def f(x):
        buf = torch.empty_like(torch.zeros(4, 3, dtype=x.dtype).T)  # (3, 4), column-major
        buf.zero_()
        v = buf.view(3, 2, 2)    # a view only the column-major layout allows
        v[:, 1, 0] = x           # buf[:, 2] = x
        return buf * 2
    check_frule(f, rand(3), paths=("eager", "auto"))


def test_item_based_loop():
    def f(x):
        n = int(x.abs().sum().item() * 10) % 3 + 1
        y = x
        for _ in range(n):
            y = torch.sin(y)
        return y
    x = rand(4)
    check_frule(f, x, paths=("eager", "auto"))


@pytest.mark.parametrize("path", ["eager", "graph", "auto"])
@pytest.mark.parametrize("through_view", [False, True])
def test_writing_tangent_into_untracked_tensor_fails_loudly(path, through_view):
    g = torch.zeros(3, dtype=D)

    def f(x):
        (g[:] if through_view else g).copy_(x)
        return g * 2
    with pytest.raises(RuntimeError, match="does not track"):
        torch_fwd.jvp(f, (rand(3),), (rand(3),), path=path)
    assert torch.equal(g, torch.zeros(3, dtype=D))  # refused before anything was written


# ---- guards: a cached graph is never reused where it is not valid ---------------------------

def test_cache_respects_shapes_dtypes_chunks_and_closures():
    scale = [2.0]
    w = rand(3)

    def f(x):
        return torch.sin(x * scale[0]) * w
    for shape, dtype in [((3,), D), ((2, 3), D), ((3,), torch.float32)]:
        x = torch.randn(shape, dtype=dtype)
        v = torch.randn(shape, dtype=dtype)
        _, t = torch_fwd.jvp(f, (x,), (v,))
        torch.testing.assert_close(t, torch.cos(x * 2.0) * 2.0 * v * w)
    assert torch_fwd.explain() == "graph"
    x, v = rand(3), rand(3)
    scale[0] = 5.0  # a Python value the trace read
    _, t = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, torch.cos(x * 5.0) * 5.0 * v * w)
    w = rand(3)  # rebinding a closed-over tensor
    _, t = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, torch.cos(x * 5.0) * 5.0 * v * w)
    w.mul_(3)  # mutating it in place
    _, t = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, torch.cos(x * 5.0) * 5.0 * v * w)
    V = rand(5, 3)
    _, t = torch_fwd.jvp(f, (x,), (V,), chunked=True)
    torch.testing.assert_close(t, torch.cos(x * 5.0) * 5.0 * V * w)


def test_global_python_value_change_is_seen():
    global _GLOBAL_SCALE
    x, v = rand(3), rand(3)
    for s in (1.0, 3.0):
        _GLOBAL_SCALE = s
        _, t = torch_fwd.jvp(_uses_global, (x,), (v,))
        torch.testing.assert_close(t, torch.cos(x * s) * s * v)


_GLOBAL_SCALE = 1.0


def _uses_global(x):
    return torch.sin(x * _GLOBAL_SCALE)


def test_module_parameter_changes_are_seen():
    lin = torch.nn.Linear(3, 2).double()
    x, v = rand(4, 3), rand(4, 3)
    _, t1 = torch_fwd.jvp(lin, (x,), (v,))
    torch.testing.assert_close(t1, v @ lin.weight.T)
    with torch.no_grad():
        lin.weight.mul_(2)
    _, t2 = torch_fwd.jvp(lin, (x,), (v,))
    torch.testing.assert_close(t2, v @ lin.weight.T)
    assert torch_fwd.explain() == "graph"


# ---- the graph pass ------------------------------------------------------------------------------

def test_mlp_jvp_graph_has_only_the_matmuls_a_person_would_write():
    W1, W2 = rand(5, 4), rand(3, 5)

    def f(x):
        return W2 @ torch.tanh(W1 @ x)
    gm = torch_fwd.make_jvp_graph(f, rand(4, 2), chunk=4)
    mms = [n for n in gm.graph.nodes if n.op == "call_function" and
           n.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)]
    assert len(mms) == 4, gm.code  # two primal, two tangent; none against a zero tangent
    x, V = rand(4, 2), rand(4, 4, 2)
    y, ty = gm(x, V)
    _, ref = torch_fwd.jvp(f, (x,), (V,), chunked=True, path="eager")
    torch.testing.assert_close(ty, ref)
    assert "tangent_0" in gm.code and "primal_0" in gm.code


def test_make_jvp_graph_inactive_output_and_dead_tangent_elimination():
    def f(x, w):
        return x.sin() * w, w.shape[0] * torch.ones(2, dtype=w.dtype)
    gm = torch_fwd.make_jvp_graph(f, rand(3), rand(3), chunk=2)
    x, w, tx, tw = rand(3), rand(3), rand(2, 3), rand(2, 3)
    y, c, ty, tc = gm(x, w, tx, tw)
    torch.testing.assert_close(ty, tx * x.cos() * w + x.sin() * tw)
    assert torch.equal(tc, torch.zeros(2, 2, dtype=D))


def test_make_jvp_graph_rejects_data_dependent_control_flow():
    def f(x):
        return x.sin() if x.sum() > 0 else x
    with pytest.raises(Exception):
        torch_fwd.make_jvp_graph(f, rand(3))


def test_dual_is_traceable_wrapper_subclass():
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    d = torch_fwd.Dual(rand(3), rand(2, 3))
    assert is_traceable_wrapper_subclass(d)
    names, ctx = d.__tensor_flatten__()
    inner = {n: getattr(d, n) for n in names}
    d2 = torch_fwd.Dual.__tensor_unflatten__(inner, ctx, d.shape, d.stride())
    assert torch.equal(d2.primal, d.primal) and torch.equal(d2.tangent, d.tangent)
    y = torch.sin(d)
    torch.testing.assert_close(y.tangent, d.tangent * d.primal.cos())


def test_dual_rejects_bad_tangent():
    with pytest.raises(ValueError, match="not"):
        torch_fwd.Dual(rand(3), rand(3))
    with pytest.raises(TypeError):
        torch_fwd.Dual([1.0], None)


@pytest.mark.parametrize("path", PATHS)
def test_detach_drops_the_tangent(path):
    x, v = rand(3), rand(3)
    _, t = torch_fwd.jvp(lambda x: x.detach() * x, (x,), (v,), path=path)
    torch.testing.assert_close(t, x * v)  # d(c x) with c = x held constant


# ---- state: dropout and batch norm -----------------------------------------------------------

@pytest.mark.parametrize("path", ["eager", "graph"])
def test_dropout_uses_the_primal_mask(path):
    x, v = rand(200) + 3.0, rand(200)
    torch.manual_seed(1)
    out, t = torch_fwd.jvp(lambda x: F.dropout(x, 0.4, training=True), (x,), (v,), path=path)
    kept = out != 0
    assert 0 < kept.sum() < 200
    torch.testing.assert_close(t[kept], v[kept] / 0.6)
    assert torch.all(t[~kept] == 0)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_batch_norm_running_stats_updated_like_the_primal(path):
    bn = torch.nn.BatchNorm1d(3).double().train()
    ref = torch.nn.BatchNorm1d(3).double().train()
    x, v = rand(8, 3), rand(8, 3)
    with torch.no_grad():
        out, t = torch_fwd.jvp(bn, (x,), (v,), path=path)
    ref_out = ref(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert type(bn.running_mean) is torch.Tensor
    assert bn.num_batches_tracked.item() == 1
    _, t_ref = torch.func.jvp(lambda x: F.batch_norm(x, None, None, bn.weight, bn.bias, training=True), (x,), (v,))
    torch.testing.assert_close(t, t_ref)


def test_capture_cache_is_bounded_for_lambdas_made_every_step():
    from torch_fwd import api
    x, v = rand(3), rand(3)
    for i in range(api._CAPTURE_CACHE_SIZE + 20):
        _, t = torch_fwd.jvp(lambda x: torch.sin(x) * 2, (x,), (v,))
    assert len(api._captures) <= api._CAPTURE_CACHE_SIZE
    torch.testing.assert_close(t, 2 * torch.cos(x) * v)


def test_capture_cache_keeps_what_is_used_and_skips_unhashable_callables():
    from torch_fwd import api

    def hot(x):
        return torch.cos(x) * 3

    class Unhashable:
        __hash__ = None

        def __call__(self, x):
            return torch.sin(x)

    def make(i):  # a new closure cell each time: a function of its own
        return lambda x: torch.sin(x) * i

    x, v = rand(3), rand(3)
    torch_fwd.jvp(hot, (x,), (v,))
    for i in range(api._CAPTURE_CACHE_SIZE + 20):
        torch_fwd.jvp(make(i), (x,), (v,))
        torch_fwd.jvp(hot, (x,), (v,))  # used all along: never the least recent
    assert api._same_function_key(hot) in api._captures
    assert len(api._captures) == api._CAPTURE_CACHE_SIZE
    n = len(api._captures)
    _, t = torch_fwd.jvp(Unhashable(), (x,), (v,))
    torch.testing.assert_close(t, torch.cos(x) * v)
    assert len(api._captures) == n


def test_a_lambda_made_anew_each_call_reuses_one_capture():
    """The same code over the same cells is one function to the capture cache: a lambda
    written in a training loop is not captured (or, failing, retried) anew each step.
    Different closure contents or defaults are never served another's capture."""
    from torch_fwd import api
    w = rand(3)
    x, v = rand(3), rand(3)
    keys = set()
    for _ in range(3):
        f = lambda a: torch.sin(a) * w  # noqa: E731
        _, t = torch_fwd.jvp(f, (x,), (v,))
        torch.testing.assert_close(t, torch.cos(x) * v * w)
        keys.add(api._same_function_key(f))
        assert api._captures[api._same_function_key(f)] is api._capture_for(f)
    assert len(keys) == 1
    for s in (2.0, 3.0):  # same code, other defaults
        _, t = torch_fwd.jvp(lambda a, s=s: a * s, (x,), (v,))
        torch.testing.assert_close(t, v * s)
    for s in (2.0, 3.0):  # same code, other cells
        _, t = torch_fwd.jvp((lambda k: (lambda a: a * k))(s), (x,), (v,))
        torch.testing.assert_close(t, v * s)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_rrelu_training_uses_the_primal_slopes(path):
    x, v = rand(50), rand(50)
    torch.manual_seed(0)
    with torch.no_grad():
        out, t = torch_fwd.jvp(lambda x: F.rrelu(x, 0.1, 0.3, training=True), (x,), (v,), path=path)
    slopes = out / x
    assert torch.all((slopes[x < 0] >= 0.1) & (slopes[x < 0] <= 0.3))
    torch.testing.assert_close(t, v * slopes)


@pytest.mark.parametrize("path", ["graph", "eager"])
@pytest.mark.parametrize("view", [lambda x: x.T, lambda x: x[1], lambda x: x.view(-1), lambda x: x.mT[::2],
                                  lambda x: (x, x.T, x.sin()), lambda x: x.unsqueeze(0).expand(2, 3, 4)])
def test_outputs_that_are_views_of_inputs(path, view):
    """Dynamo re-creates such outputs outside its graph: their tangents must still come
    through the view, never as a silent zero."""
    x, v = rand(3, 4), rand(3, 4)
    out, t = torch_fwd.jvp(view, (x,), (v,), path=path)
    ref_out, ref_t = torch.func.jvp(view, (x,), (v,))
    torch.testing.assert_close(t, ref_t)


@pytest.mark.parametrize("path", ["graph", "eager"])
def test_view_of_a_mutated_input(path):
    def f(x):
        x.mul_(3)
        return x.T
    x, v = rand(3, 4), rand(3, 4)
    _, t = torch_fwd.jvp(f, (x.clone(),), (v,), path=path)
    torch.testing.assert_close(t, 3 * v.T)
