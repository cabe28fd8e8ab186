"""Every library rule family's own TEST_CASES (listed beside the rules in rules/*.py),
through check_frule: finite differences and torch.func.jvp, eager and graph path, K = 1
and K = 3, zero and non-zero tangents."""
import contextlib

import pytest
import torch

import torch_fwd
from torch_fwd import rules, triton_kernels
from torch_fwd.testing import check_frule

CASES = [(fam.__name__.rsplit(".", 1)[-1], c) for fam in rules.FAMILIES for c in getattr(fam, "TEST_CASES", [])]


@pytest.mark.parametrize("family,case", CASES, ids=[f"{f}-{c.name}" for f, c in CASES])
def test_rule(family, case):
    torch.manual_seed(0)
    args = case.make_args()
    paths = ("eager", "graph") if case.graph else ("eager",)
    n = check_frule(case.fn, *args, argnums=case.argnums, paths=paths, atol=case.atol, rtol=case.rtol,
                    check_torch_func=case.check_torch_func)
    assert n > 0


# The families with rules that take another form in graphs traced for Inductor
# (triton_kernels.under_inductor: elementwise partials added without addcmul, a
# convolution joined over its input and the input's tangents, attention's layout copies
# as opaque ATen calls), checked in that form.
INDUCTOR_FORM = [(f, c) for f, c in CASES if f == "elementwise" or (f == "nn" and c.name.startswith(("conv", "sdpa")))]


@pytest.mark.parametrize("family,case", INDUCTOR_FORM, ids=[f"{f}-{c.name}" for f, c in INDUCTOR_FORM])
def test_rule_in_its_form_for_inductor(family, case):
    torch.manual_seed(0)
    args = case.make_args()
    paths = ("eager", "graph") if case.graph else ("eager",)
    with triton_kernels.for_inductor():
        n = check_frule(case.fn, *args, argnums=case.argnums, paths=paths, atol=case.atol, rtol=case.rtol,
                        check_torch_func=case.check_torch_func)
    assert n > 0


def test_attention_for_inductor_lays_its_operands_and_tangent_out_with_opaque_copies():
    """Under Inductor, for one direction and no autograd: [Q | dQ] and [dK^T ; K^T] are made
    by torch_fwd::layout_cat and the output's tangent is laid out as the fused op's output
    by torch_fwd::restrided, so the out-projection reads it as a view (no clone before
    its matmul); otherwise plain ops."""
    import torch.nn.functional as F
    B, H, S, D = 2, 3, 5, 4
    # heads split off projections, as in a model: (B, S, H, D) in memory, and the fused op's
    # output too
    q, k, v = (torch.randn(B, S, H, D).transpose(1, 2) for _ in range(3))
    w = torch.randn(H * D, 6)

    def block(q, k, v):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, H * D) @ w

    def targets(chunk, inductor=True, for_autograd=False):
        with triton_kernels.for_inductor() if inductor else contextlib.nullcontext():
            gm = torch_fwd.make_jvp_graph(block, q, k, v, chunk=chunk, for_autograd=for_autograd)
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]
    ops = targets(1)
    assert ops.count(torch.ops.torch_fwd.layout_cat.default) == 2
    assert ops.count(torch.ops.torch_fwd.restrided.default) == 1
    assert torch.ops.aten.clone.default not in ops
    for other in (targets(3), targets(1, inductor=False), targets(1, for_autograd=True)):
        assert torch.ops.torch_fwd.layout_cat.default not in other
        assert torch.ops.torch_fwd.restrided.default not in other


def test_convolution_for_inductor_is_one_convolution_of_input_and_tangents():
    import torch.nn.functional as F
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)

    def convolutions(f, *args, chunk):
        with triton_kernels.for_inductor():
            gm = torch_fwd.make_jvp_graph(f, *args, chunk=chunk, for_autograd=False)
        return [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default]
    for chunk in (1, 3):
        (conv,) = convolutions(lambda x: F.conv2d(x, w), x, chunk=chunk)
        assert conv.meta["val"].shape[0] == (1 + chunk) * 2
    # a bias (which the tangents must not get) or a weight with a tangent: two convolutions or more
    assert len(convolutions(lambda x: F.conv2d(x, w, b), x, chunk=1)) == 2
    assert len(convolutions(lambda x, w: F.conv2d(x, w), x, w, chunk=1)) >= 2
