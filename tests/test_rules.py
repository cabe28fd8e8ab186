"""Every library rule family's own TEST_CASES (listed beside the rules in rules/*.py),
through check_frule: finite differences and torch.func.jvp, eager and graph path, K = 1
and K = 3, zero and non-zero tangents."""
import pytest
import torch

from torch_fwd import rules
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
