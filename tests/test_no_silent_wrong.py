"""Silent wrong answers found by adversarial testing, each pinned where it was fixed:
memory a Dual does not own, outputs sharing an input's memory, hooks added after a
capture, a user rule's tangent of the wrong shape, the oracle check_frule trusts, and
what the graph path does with the user's own errors."""
import copy
import warnings

import numpy as np
import pytest
import torch

import torch_fwd
from torch_fwd.testing import OracleNotApplicable, check_frule

D = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=D)


# ---------------------------------------------------------------------------------------
# 1. ways out of the tensor world inside the eager path
# ---------------------------------------------------------------------------------------

C = torch.arange(3, dtype=D)


@pytest.mark.parametrize("path", ["auto", "eager"])
@pytest.mark.parametrize("read", [
    lambda a: float(a.detach().numpy().sum()),
    lambda a: float(np.asarray(a.detach()).sum()),
    lambda a: float(C.numpy().sum()) + float(a.detach().sum()) - 3,
    lambda a: float(np.asarray(C).sum()) + sum(a.detach().tolist()) - 3,
    lambda a: float((a * 1).detach().numpy().sum()),
], ids=["detach_numpy", "asarray_detach", "constant_numpy", "constant_asarray_tolist", "intermediate_numpy"])
def test_values_read_through_numpy_are_the_real_ones(path, read):
    # the scalar read is sum(a): a constant to the JVP, so the tangent is v * sum(a)
    x, v = rand(3), rand(3)
    out, t = torch_fwd.jvp(lambda a: a * read(a), (x,), (v,), path=path)
    torch.testing.assert_close(out, x * x.sum())
    torch.testing.assert_close(t, v * x.sum())


def test_writes_through_numpy_reach_a_buffer_the_function_made():
    def f(a):
        buf = torch.zeros(3, dtype=D)
        buf.numpy()[:] = [1.0, 2.0, 3.0]
        return a * buf
    x, v = rand(3), rand(3)
    out, t = torch_fwd.jvp(f, (x,), (v,), path="eager")
    w = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    torch.testing.assert_close(out, x * w)
    torch.testing.assert_close(t, v * w)


@pytest.mark.parametrize("share", [
    lambda a: a.numpy(), lambda a: np.asarray(a), lambda a: (a * 2).numpy(), lambda a: a.__dlpack__(),
    lambda a: a.T.numpy(),
], ids=["numpy", "asarray", "intermediate", "dlpack", "view"])
def test_memory_of_a_tensor_with_a_tangent_is_refused(share):
    x, v = rand(3, 3), rand(3, 3)
    with pytest.raises(RuntimeError, match="carries a tangent.*detach"):
        torch_fwd.jvp(lambda a: a * float(share(a).sum()), (x,), (v,), path="eager")


def test_copies_and_addresses_of_a_dual():
    x, v = rand(3), rand(3)
    seen = {}

    def f(a):
        d = a.detach()
        seen["same_address"] = d.data_ptr() == x.data_ptr() != 0
        seen["forced"] = a.numpy(force=True).tolist()  # a copy: allowed
        b = copy.deepcopy(a * 2)
        return b
    out, t = torch_fwd.jvp(f, (x,), (v,), path="eager")
    assert seen["same_address"] and seen["forced"] == x.tolist()
    torch.testing.assert_close(t, 2 * v)


def test_aliases_of_untracked_tensors_stay_plain_and_refuse_tangents():
    x, v = rand(3), rand(3)
    g = torch.zeros(3, dtype=D)

    def f(a):
        g.detach().copy_(a)  # a value with a tangent written into a global's memory
        return a
    with pytest.raises(RuntimeError, match="does not track"):
        torch_fwd.jvp(f, (x,), (v,), path="eager")


# ---------------------------------------------------------------------------------------
# 2. outputs that share an input's memory in the graph path
# ---------------------------------------------------------------------------------------

BASE = rand(5, 3)


def _check_output_tangent(f, path, compile, x=None):
    x = BASE[:3] if x is None else x
    v = rand(*x.shape)
    out, t = torch_fwd.jvp(f, (x,), (v,), path=path, compile=compile)
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)
    return t


ZERO_TANGENT = {
    "detach": lambda a: a.detach(),
    "data": lambda a: a.data,
    "detach_index": lambda a: a.detach()[0],
    "detach_T": lambda a: a.detach().T,
    "data_T": lambda a: a.data.T,
    "closure_base": lambda a: BASE,
    "closure_base_T": lambda a: (a * 1, BASE.T)[1],
}
VIEW_TANGENT = {
    "identity": lambda a: a,
    "T": lambda a: a.T,
    "mT": lambda a: a.mT,
    "slice": lambda a: a[1:],
    "several": lambda a: (a.T, a * 2, a),
}


@pytest.mark.parametrize("path", ["auto", "graph"])
@pytest.mark.parametrize("name", list(ZERO_TANGENT))
def test_outputs_sharing_memory_without_a_tangent_get_zero(path, name):
    t = _check_output_tangent(ZERO_TANGENT[name], path, False)
    assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("name", ["detach", "data", "closure_base"])
def test_outputs_sharing_memory_without_a_tangent_get_zero_compiled(name):
    t = _check_output_tangent(ZERO_TANGENT[name], "auto", True)
    assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("path", ["auto", "graph"])
@pytest.mark.parametrize("name", list(VIEW_TANGENT))
def test_views_of_inputs_keep_their_tangent(path, name):
    _check_output_tangent(VIEW_TANGENT[name], path, False)


def test_a_view_that_could_be_of_two_tensors_is_an_error():
    g = BASE[:3]  # another tensor over the input's very memory, read by the function

    def f(a):
        return a * 2, g.T  # dynamo (2.13) rebuilds g.T after its graph
    try:
        _, t = torch_fwd.jvp(f, (BASE[:3],), (rand(3, 3),), path="graph")
    except RuntimeError as e:
        assert "cannot be told" in str(e)
    else:  # (torch 2.14's dynamo returns g.T from the graph: a constant, as torch.func has it)
        assert torch.equal(t[1], torch.zeros(3, 3, dtype=D))


# ---------------------------------------------------------------------------------------
# 3. hooks added after the first call
# ---------------------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def _jvp_runner(kind, m, x, v):
    if kind == "JVP":
        wrapped = torch_fwd.JVP(m)
        return lambda: wrapped(x, tangents=(v,))[1]
    f = (lambda a: m(a))
    return lambda: torch_fwd.jvp(f, (x,), (v,))[1]


@pytest.mark.parametrize("kind", ["jvp", "JVP"])
def test_module_hooks_added_or_removed_after_the_capture_take_effect(kind):
    m, x, v = _mlp(), rand(2, 3), rand(2, 3)
    run = _jvp_runner(kind, m, x, v)

    def ref():
        return torch.func.jvp(lambda a: m(a), (x,), (v,))[1]
    with torch.no_grad():
        torch.testing.assert_close(run(), ref())
        h = m[0].register_forward_hook(lambda mod, i, o: o * 2)
        torch.testing.assert_close(run(), ref())
        h.remove()
        torch.testing.assert_close(run(), ref())
        h = m[2].register_forward_pre_hook(lambda mod, i: (i[0] ** 2,))
        torch.testing.assert_close(run(), ref())
        h.remove()
        h = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, i, o: o.sin() if isinstance(mod, torch.nn.Linear) else o)
        try:
            torch.testing.assert_close(run(), ref())
            assert torch_fwd.explain().startswith("eager (global module hooks")
        finally:
            h.remove()
        torch.testing.assert_close(run(), ref())
        assert torch_fwd.explain() == "graph"


def test_hooks_reach_compiled_regions_across_a_graph_break():
    m, x, v = _mlp(), rand(2, 3), rand(2, 3)

    def f(a):
        h = m[0](a)
        torch._dynamo.graph_break()
        return m[2](m[1](h))
    with torch.no_grad():
        for step in range(3):
            if step == 1:
                h = m[2].register_forward_hook(lambda mod, i, o: o * 3)
            if step == 2:
                h.remove()
            t = torch_fwd.jvp(f, (x,), (v,), compile=True)[1]
            torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])


# ---------------------------------------------------------------------------------------
# 4. a user rule's tangent of the wrong shape
# ---------------------------------------------------------------------------------------

@pytest.fixture
def twice():
    lib = torch.library.Library("t_no_silent", "FRAGMENT")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("twice", lambda x: torch.empty_like(x), "Meta")
    op = torch.ops.t_no_silent.twice.default
    yield op
    torch_fwd.unregister_frule(op)
    lib._destroy()


@pytest.mark.parametrize("path", ["eager", "graph"])
@pytest.mark.parametrize("k,tangent,given", [
    (None, lambda t: (2 * t)[:, :1], (1, 1)),  # (K, 1): would broadcast
    (3, lambda t: (2 * t)[0], (3,)),           # K dropped where K equals the output's size
    (3, lambda t: (2 * t).sum() * 0 + 2, ()),  # 0-d
    (3, lambda t: (2 * t)[:1], (1, 3)),        # K = 1 where K = 3
], ids=["K_by_1", "no_K", "0d", "wrong_K"])
def test_a_rule_returning_a_wrong_shape_is_named(twice, path, k, tangent, given):
    torch_fwd.register_frule(twice, lambda p, t: (p[0] * 2, tangent(t[0])))
    x = rand(3)
    v = rand(3) if k is None else rand(k, 3)
    expected = (1 if k is None else k, 3)
    with pytest.raises(ValueError, match=rf"the rule for t_no_silent.twice.default, returned a tangent of shape "
                                         rf"\({', '.join(map(str, given))},?\).*expected \({expected[0]}, 3\)"):
        torch_fwd.jvp(lambda a: twice(a), (x,), (v,), chunked=k is not None, path=path)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_a_rule_may_leave_K_out_for_one_direction(twice, path):
    torch_fwd.register_frule(twice, lambda p, t: (p[0] * 2, 2 * t[0][0]))
    x, v = rand(3), rand(3)
    torch.testing.assert_close(torch_fwd.jvp(lambda a: twice(a), (x,), (v,), path=path)[1], 2 * v)


# ---------------------------------------------------------------------------------------
# 5. check_frule when torch.func cannot see into the op
# ---------------------------------------------------------------------------------------

def test_check_frule_notices_that_torch_func_is_blind_to_a_custom_op(twice):
    torch_fwd.register_frule(twice, lambda p, t: (p[0] * 2, 2 * t[0]))
    with pytest.warns(OracleNotApplicable, match="zero tangent for output 0 where finite differences do not"):
        assert check_frule(twice, rand(4)) > 0
    # a wrong rule still fails, on finite differences
    torch_fwd.register_frule(twice, lambda p, t: (p[0] * 2, 3 * t[0]))
    with pytest.raises(AssertionError, match="finite differences"):
        check_frule(twice, rand(4))


def test_check_frule_still_uses_torch_func_where_it_applies():
    with warnings.catch_warnings():
        warnings.simplefilter("error", OracleNotApplicable)
        assert check_frule(torch.sin, rand(4)) > 0


# ---------------------------------------------------------------------------------------
# 6-7. the graph path hands the user's own errors back as they are
# ---------------------------------------------------------------------------------------

def _raises(a):
    if a.shape[0] == 3:
        raise ValueError("the user's own error")
    return a


@pytest.mark.parametrize("path,compile", [("auto", False), ("graph", False), ("eager", False), ("graph", True)])
def test_the_users_exception_reaches_them_as_raised(path, compile):
    with pytest.raises(ValueError, match="the user's own error") as info:
        torch_fwd.jvp(_raises, (rand(3),), (rand(3),), path=path, compile=compile)
    assert info.traceback[-1].name == "_raises"


@pytest.mark.parametrize("path", ["auto", "graph", "eager"])
def test_a_function_returning_a_python_number_is_told_so(path):
    with pytest.raises(TypeError, match="func must return tensors .* output leaf 0 is a float"):
        torch_fwd.jvp(lambda a: 1.5, (rand(3),), (rand(3),), path=path)


# ---------------------------------------------------------------------------------------
# 8. torch.no_grad() inside a function whose outputs autograd differentiates
# ---------------------------------------------------------------------------------------

W_NG = torch.randn(3, 3, dtype=D, requires_grad=True)


def _no_grad_inside(x):
    with torch.no_grad():
        s = (x * W_NG.sum()).sum()
    return x * s + x @ W_NG


def _no_grad_inside_with_break(x):
    if x.sum() > -1e6:
        return _no_grad_inside(x)
    return x


@pytest.mark.parametrize("fn", [_no_grad_inside, _no_grad_inside_with_break], ids=["one_graph", "regions"])
@pytest.mark.parametrize("options", [{}, {"compile": True}], ids=["auto", "compiled"])
def test_no_grad_inside_is_kept_when_autograd_differentiates(fn, options):
    # the graphs' ATen lowering drops grad-mode switches: the part the user excluded was
    # differentiated (gradients 2-6x too large) until such graphs went to the eager path
    x = torch.randn(3, 3, dtype=D, requires_grad=True)
    v = torch.randn(3, 3, dtype=D, requires_grad=True)
    out, t = torch_fwd.jvp(fn, (x,), (v,), **options)
    ours = torch.autograd.grad((out ** 2).sum() + (t ** 2).sum(), [x, v, W_NG])
    out, t = torch.func.jvp(fn, (x,), (v,))
    ref = torch.autograd.grad((out ** 2).sum() + (t ** 2).sum(), [x, v, W_NG])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_no_grad_inside_on_the_graph_path_is_refused_by_name():
    x = torch.randn(3, 3, dtype=D, requires_grad=True)
    with pytest.raises(RuntimeError, match="grad mode"):
        torch_fwd.jvp(_no_grad_inside, (x,), (torch.randn(3, 3, dtype=D),), path="graph")
    with torch.no_grad():  # nothing to differentiate: the graph path serves it
        torch_fwd.jvp(lambda a: _no_grad_inside(a), (x,), (torch.randn(3, 3, dtype=D),), path="graph")


# ---------------------------------------------------------------------------------------
# 9. detach() and .data used inside a captured function
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"path": "graph"}, {"path": "auto"}, {"compile": True}, {"path": "eager"}],
                         ids=["graph", "auto", "compiled", "eager"])
@pytest.mark.parametrize("f", [lambda a: a.data * a, lambda a: a.detach() * a, lambda a: torch.detach(a).sin() * a],
                         ids=["data", "detach", "torch_detach"])
def test_detach_and_data_inside_stop_the_tangent(f, options):
    # .data lowered to the input itself on every torch, detach() to an alias on torch 2.14:
    # both carried the input's tangent in the graph paths
    x, v = rand(3), rand(3)
    _, t = torch_fwd.jvp(f, (x,), (v,), **options)
    torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])


def test_detach_inside_a_traced_jvp_graph():
    gm = torch_fwd.make_jvp_graph(lambda a: a.detach() * a, rand(3))
    x, v = rand(3), rand(1, 3)
    out = gm(x, v)
    torch.testing.assert_close(out[1], (x * v))


def test_no_grad_inside_a_traced_jvp_graph_is_refused_for_autograd():
    # make_fx traces a plain function (make_jvp_graph): the switch is noticed there too
    x = torch.randn(3, 3, dtype=D)
    with pytest.raises(NotImplementedError, match="grad mode"):
        torch_fwd.make_jvp_graph(_no_grad_inside, x)
    gm = torch_fwd.make_jvp_graph(_no_grad_inside, x, for_autograd=False)
    v = torch.randn(1, 3, 3, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, v)[1][0], torch.func.jvp(_no_grad_inside, (x,), (v[0],))[1])


# ---------------------------------------------------------------------------------------
# rules run under autograd keep the user's autocast state (off): float32 stays float32
# ---------------------------------------------------------------------------------------

def _f32_cases():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 192)
    conv = torch.nn.Conv1d(4, 8, 3)
    w = torch.randn(32, 32, requires_grad=True)
    return {
        "linear": (lin, (8, 32)),
        "conv1d": (conv, (2, 4, 16)),
        "matmul": (lambda a: torch.tanh(a @ w) @ w, (8, 32)),
        "bmm": (lambda a: torch.bmm(a, a.transpose(1, 2)), (2, 8, 32)),
    }


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("name", list(_f32_cases()))
def test_float32_rules_under_autograd_compute_in_float32(name, k):
    """With parameters requiring grad, the eager path runs each rule with the dispatch
    keys above Python re-enabled; it once re-enabled autocast too, and CPU autocast ran
    every float32 matmul and convolution in bfloat16 (0.4% off, primal included)."""
    f, shape = _f32_cases()[name]
    x = torch.randn(shape, requires_grad=True)
    v = torch.randn(((k,) if k else ()) + shape)
    out, t = torch_fwd.jvp(f, (x,), (v,), path="eager", chunked=k is not None)
    torch.testing.assert_close(out, f(x), atol=1e-6, rtol=1e-6)
    ref = torch.stack([torch.func.jvp(f, (x,), (vi,))[1] for vi in v]) if k else torch.func.jvp(f, (x,), (v,))[1]
    torch.testing.assert_close(t, ref, atol=1e-5, rtol=1e-5)
    assert out.requires_grad and t.requires_grad


def test_a_users_autocast_still_applies_to_the_ops_it_casts():
    lin = torch.nn.Linear(16, 16)
    x, v = torch.randn(4, 16), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, t = torch_fwd.jvp(lin, (x,), (v,), path="eager")
        ref_out, ref_t = torch.func.jvp(lin, (x,), (v,))
    assert out.dtype == ref_out.dtype == torch.bfloat16 and t.dtype == ref_t.dtype
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t, atol=2e-2, rtol=2e-2)
