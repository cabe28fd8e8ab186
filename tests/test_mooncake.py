"""The Mooncake-style functions through jvp (both paths) and jacfwd, against torch.func."""
import pytest
import torch

import torch_fwd
from benchmarks import cases as C
from torch_fwd.testing import check_frule

D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


CASES = [
    ("sum", C.sum_1000, lambda: (rand(50),), ("eager", "graph")),
    ("loop_sum", C._sum_1000, lambda: (rand(20),), ("eager", "auto")),
    ("sum_sin", C.sum_sin_1000, lambda: (rand(50),), ("eager", "graph")),
    ("loop_sum_sin", C._sum_sin_1000, lambda: (rand(20),), ("eager", "auto")),
    ("kron_sum", C.kron_sum, lambda: (rand(4, 4), rand(5, 5)), ("eager", "graph")),
    ("kron_view_sum", C.kron_view_sum, lambda: (rand(4, 4), rand(5, 6)), ("eager", "graph")),
    ("naive_map", C.naive_map_sin_cos_exp, lambda: (rand(10),), ("eager", "auto")),
    ("map", C.map_sin_cos_exp, lambda: (rand(10),), ("eager", "graph")),
    ("broadcast", C.broadcast_sin_cos_exp, lambda: (rand(10),), ("eager", "graph")),
    ("simple_mlp", C.simple_mlp, lambda: (rand(8, 6), rand(4, 8), rand(6, 3)), ("eager", "graph")),
    ("gp_lml", C.gp_lml, lambda: (rand(16), rand(16), torch.tensor(0.1, dtype=D), torch.tensor(-1.0, dtype=D)),
     ("eager", "graph")),
    ("large_single_block", C.large_single_block, lambda: (rand(8) * 0.5,), ("eager", "graph")),
]


@pytest.mark.parametrize("name,fn,make,paths", CASES, ids=[c[0] for c in CASES])
def test_jvp(name, fn, make, paths):
    torch.manual_seed(0)
    check_frule(fn, *make(), paths=paths, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,fn,make,paths", CASES, ids=[c[0] for c in CASES])
def test_jacfwd(name, fn, make, paths):
    torch.manual_seed(0)
    args = make()
    argnums = tuple(range(len(args)))
    J = torch_fwd.jacfwd(fn, argnums=argnums, chunk_size=3)(*args)
    ref = torch.func.jacrev(fn, argnums=argnums)(*args)
    torch.testing.assert_close(J, ref)
