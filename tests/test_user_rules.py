"""User rules: register_frule / frule on ATen and torch.library ops, autograd.Function.jvp,
and what happens to an op with no rule (never a silent zero)."""
import pytest
import torch

import torch_fwd
from torch_fwd.testing import check_frule

D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


@torch.library.custom_op("torch_fwd_test::cube", mutates_args=())
def cube(x: torch.Tensor) -> torch.Tensor:
    return x ** 3


@cube.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("torch_fwd_test::norule", mutates_args=())
def norule(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@norule.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("torch_fwd_test::backward_only", mutates_args=())
def backward_only(x: torch.Tensor) -> torch.Tensor:
    return x.exp()


@backward_only.register_fake
def _(x):
    return torch.empty_like(x)


backward_only.register_autograd(lambda ctx, g: g * ctx.y,
                                setup_context=lambda ctx, inputs, output: setattr(ctx, "y", output))


@torch_fwd.frule(torch.ops.torch_fwd_test.cube.default)
def _cube_rule(primals, tangents):
    (x,), (tx,) = primals, tangents
    return cube(x), tx * 3 * x * x


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_custom_op_user_rule_both_paths(path):
    calls = []

    def f(x):
        calls.append(1)
        return torch.ops.torch_fwd_test.cube(x).sum(0)
    # torch.func.jvp silently returns zero through a custom op: finite differences only
    check_frule(f, rand(3, 4), paths=(path,), check_torch_func=False)
    assert calls


def test_custom_op_user_rule_stays_one_node_in_the_graph():
    gm = torch_fwd.make_jvp_graph(lambda x: cube(x) + 1, rand(3))
    assert "torch_fwd_test.cube" in gm.code
    assert "pow" not in gm.code


def test_custom_op_without_rule_is_an_error_naming_op_and_line():
    def f(x):
        return norule(x) * 2  # the line the error names
    for path in ("eager", "auto"):
        with pytest.raises(torch_fwd.NoRuleError) as info:
            torch_fwd.jvp(f, (rand(3),), (rand(3),), path=path)
        msg = str(info.value)
        assert "torch_fwd_test.norule" in msg and "register_frule" in msg
        assert "test_user_rules.py" in msg and "norule(x) * 2" in msg
    # torch.func.jvp returns a silent zero here; we must not
    _, t = torch.func.jvp(f, (rand(3),), (torch.ones(3, dtype=D),))
    assert torch.count_nonzero(t) == 0


def test_custom_op_with_only_a_backward_uses_double_vjp():
    check_frule(lambda x: backward_only(x) * 2, rand(5), paths=("eager", "graph"), check_torch_func=False)


def test_user_rule_overrides_library_rule_and_invalidates_cached_graphs():
    x, v = rand(3), rand(3)

    def f(x):
        return torch.sin(x)
    _, before = torch_fwd.jvp(f, (x,), (v,))
    assert torch_fwd.explain() == "graph"
    torch_fwd.jvp(f, (x,), (v,), path="eager")  # the eager path's per-op cache has seen sin
    op = torch.ops.aten.sin.default

    def wrong_on_purpose(primals, tangents):
        return torch.sin(primals[0]), tangents[0] * 7.0
    torch_fwd.register_frule(op, wrong_on_purpose)
    try:
        for path in ("eager", "auto"):
            _, t = torch_fwd.jvp(f, (x,), (v,), path=path)
            torch.testing.assert_close(t, v * 7.0)
    finally:
        torch_fwd.unregister_frule(op)
    _, after = torch_fwd.jvp(f, (x,), (v,))
    torch.testing.assert_close(after, before)


def test_packet_rule_applies_to_functional_overloads_only():
    calls = []

    def rule(primals, tangents):
        calls.append(1)
        return torch.ops.aten.cos.default(primals[0]), -tangents[0] * torch.sin(primals[0])
    torch_fwd.register_frule(torch.ops.aten.cos, rule)
    try:
        _, t = torch_fwd.jvp(lambda x: x.cos(), (rand(3),), (rand(3),), path="eager")
        assert calls
        from torch_fwd.registry import lookup
        assert lookup(torch.ops.aten.cos.out) is None
        assert lookup(torch.ops.aten.cos.default) is rule
    finally:
        torch_fwd.unregister_frule(torch.ops.aten.cos)


def test_register_frule_bad_input():
    with pytest.raises(TypeError, match="OpOverload"):
        torch_fwd.register_frule("aten::sin", lambda p, t: None)
    with pytest.raises(TypeError, match="callable"):
        torch_fwd.register_frule(torch.ops.aten.sin.default, 3)


def test_faulty_rule_shape_fails_loudly():
    @torch.library.custom_op("torch_fwd_test::badshape", mutates_args=())
    def badshape(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @badshape.register_fake
    def _(x):
        return torch.empty_like(x)
    torch_fwd.register_frule(torch.ops.torch_fwd_test.badshape.default,
                             lambda p, t: (p[0].clone(), t[0][:, :1].repeat(1, 2)))
    with pytest.raises(ValueError, match=r"badshape.*shape \(1, 2\).*expected \(1, 3\)"):
        torch_fwd.jvp(badshape, (rand(3),), (rand(3),), path="eager")


class StraightThrough(torch.autograd.Function):
    """round() forward, identity derivative: differentiating the forward would give zero."""

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, tx):
        return tx

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("path", ["eager", "auto"])
def test_autograd_function_jvp_is_used_not_traced_around(path):
    x, v = rand(4), rand(3, 4)
    _, t = torch_fwd.jvp(lambda x: StraightThrough.apply(x) * 2, (x,), (v,), chunked=True, path=path)
    torch.testing.assert_close(t, 2 * v)
    if path == "auto":
        assert "StraightThrough" in torch_fwd.explain()


def test_autograd_function_without_jvp_is_differentiated_through():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            return g
    check_frule(lambda x: NoJvp.apply(x), rand(3), paths=("eager",), check_torch_func=False)


# ---- Python functions as rule keys (opaque, like jax.custom_jvp) -------------------------------

def _clipped_sqrt(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(x.clamp_min(eps))


def _uses_clipped_sqrt(x):
    return _clipped_sqrt(x, 1e-3) * 2


@torch_fwd.frule(_clipped_sqrt)
def _clipped_sqrt_rule(primals, tangents):
    x, eps = primals
    y = _clipped_sqrt(x, eps)
    # a deliberately smoothed derivative: proves the rule, not the body, is used
    return y, tangents[0] * 0.5 / (y + 1.0)


@pytest.mark.parametrize("path", ["eager", "graph", "auto"])
def test_python_function_rule_is_used_in_both_paths(path):
    x, v = rand(4).abs(), rand(2, 4)
    out, t = torch_fwd.jvp(_uses_clipped_sqrt, (x,), (v,), chunked=True, path=path)
    y = torch.sqrt(x.clamp_min(1e-3))
    torch.testing.assert_close(out, 2 * y)
    torch.testing.assert_close(t, 2 * v * 0.5 / (y + 1.0))


def test_python_function_stays_one_node_and_still_works_as_a_function():
    torch.testing.assert_close(_clipped_sqrt(torch.tensor([4.0], dtype=D), 1e-3), torch.tensor([2.0], dtype=D))
    from torch_fwd.capture import to_aten
    gm = to_aten(_uses_clipped_sqrt, [rand(3)])
    assert "torch_fwd_user" in gm.code and "sqrt" not in gm.code.replace("clipped_sqrt", "")


def test_python_function_key_needs_annotations():
    def untyped(x):
        return x
    with pytest.raises(TypeError, match="annotations"):
        torch_fwd.register_frule(untyped, lambda p, t: (p[0], t[0]))


def test_inplace_op_finds_a_functional_twin_defined_after_a_first_failure():
    # the eager path looks up an in-place op's functional twin once per op; "none" is not
    # remembered, so a twin defined later is found
    lib = torch.library.Library("torch_fwd_twin", "DEF")
    lib.define("scale_(Tensor(a!) x) -> Tensor(a!)")
    lib.impl("scale_", lambda x: x.mul_(2), "CompositeExplicitAutograd")
    x, v = rand(3), rand(3)

    def f(x):
        y = x.clone()
        torch.ops.torch_fwd_twin.scale_(y)
        return y
    with pytest.raises(torch_fwd.NoRuleError, match="no functional counterpart"):
        torch_fwd.jvp(f, (x,), (v,), path="eager")
    lib.define("scale(Tensor x) -> Tensor")
    lib.impl("scale", lambda x: x * 2, "CompositeExplicitAutograd")
    op = torch.ops.torch_fwd_twin.scale.default
    torch_fwd.register_frule(op, lambda p, t: (op(p[0]), None if t[0] is None else t[0] * 2))
    try:
        out, t = torch_fwd.jvp(f, (x,), (v,), path="eager")
        torch.testing.assert_close(out, 2 * x)
        torch.testing.assert_close(t, 2 * v)
    finally:
        torch_fwd.unregister_frule(op)
