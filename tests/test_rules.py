"""Every library rule family's own TEST_CASES (listed beside the rules in rules/*.py),
through check_frule: finite differences and torch.func.jvp, eager and graph path, K = 1
and K = 3, zero and non-zero tangents."""
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
# convolution joined over its input and the input's tangents), checked in that form.
INDUCTOR_FORM = [(f, c) for f, c in CASES if f == "elementwise" or (f == "nn" and c.name.startswith("conv"))]


@pytest.mark.parametrize("family,case", INDUCTOR_FORM, ids=[f"{f}-{c.name}" for f, c in INDUCTOR_FORM])
def test_rule_in_its_form_for_inductor(family, case):
    torch.manual_seed(0)
    args = case.make_args()
    paths = ("eager", "graph") if case.graph else ("eager",)
    with triton_kernels.for_inductor():
        n = check_frule(case.fn, *args, argnums=case.argnums, paths=paths, atol=case.atol, rtol=case.rtol,
                        check_torch_func=case.check_torch_func)
    assert n > 0


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
