import subprocess
import sys

import pytest
import torch

import torch_fwd

D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


def f(x, w):
    return torch.tanh(w @ x).sum(-1), (x * 2).T


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 7, 100])
@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_matches_torch_func_jacfwd(chunk_size, argnums):
    x, w = rand(3, 4), rand(5, 3)
    J = torch_fwd.jacfwd(f, argnums=argnums, chunk_size=chunk_size)(x, w)
    ref = torch.func.jacfwd(f, argnums=argnums)(x, w)
    torch.testing.assert_close(J, ref)


@pytest.mark.parametrize("path", ["graph", "eager"])
@pytest.mark.parametrize("g", [lambda x: x, lambda x: x.T, lambda x: (x[1:], 2 * x)], ids=["identity", "view", "slice"])
def test_tangents_that_are_views_of_the_basis(g, path):
    # jacfwd reuses one basis block across chunks, clearing its ones after each pass: a
    # tangent out that is a view of that block must be read before the clearing
    x = rand(3, 4)
    J = torch_fwd.jacfwd(g, chunk_size=5, path=path)(x)
    torch.testing.assert_close(J, torch.func.jacfwd(g)(x))


def test_has_aux_and_pytree_input():
    def g(d):
        return d["a"].sin() * d["b"], d["a"].sum()
    d = {"a": rand(3), "b": rand(3)}
    J, aux = torch_fwd.jacfwd(g, has_aux=True, chunk_size=2)(d)
    ref, ref_aux = torch.func.jacfwd(g, has_aux=True)(d)
    torch.testing.assert_close(J, ref)
    torch.testing.assert_close(aux, ref_aux)


def test_scalar_input_and_output():
    J = torch_fwd.jacfwd(lambda x: x ** 3)(torch.tensor(2.0, dtype=D))
    torch.testing.assert_close(J, torch.tensor(12.0, dtype=D))


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        torch_fwd.jacfwd(torch.sin, chunk_size=0)
    with pytest.raises(TypeError, match="argnums"):
        torch_fwd.jacfwd(torch.sin, argnums="x")
    with pytest.raises(ValueError, match="out of range"):
        torch_fwd.jacfwd(torch.sin, argnums=2)(rand(3))
    with pytest.raises(TypeError, match="floating"):
        torch_fwd.jacfwd(lambda x: x * 1.0)(torch.arange(3))


def test_pick_chunk_size_is_balanced_and_within_budget():
    from torch_fwd.api import pick_chunk_size
    assert pick_chunk_size(10, 1, 8, budget=10**9) == 10
    # per direction 8 * 6401 * 2 bytes: 64 MiB allows 655 -> 10 chunks, balanced at 640
    assert pick_chunk_size(6400, 1, 8, budget=2 ** 26) == 640
    assert pick_chunk_size(6400, 1, 8, budget=2 ** 24) == 160  # 163 -> 40 chunks of 160
    assert pick_chunk_size(7, 1, 8, budget=1) == 1


_MEASURE = r"""
import resource, sys, torch, torch_fwd
torch.manual_seed(0)
n, k = int(sys.argv[1]), sys.argv[2]
W1 = torch.randn(64, n, dtype=torch.float64) / n ** 0.5
W2 = torch.randn(8, 64, dtype=torch.float64)
f = lambda x: W2 @ torch.tanh(W1 @ x)
x = torch.randn(n, dtype=torch.float64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
J = torch_fwd.jacfwd(f, chunk_size=int(k), path="eager")(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def _peak(n, k):
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(n), str(k)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_peak_memory_grows_with_chunk_not_input_size():
    # n^2 for an identity basis would be 3.2 GB at n = 20000: the chunked basis is k * n
    small_k = _peak(20000, 8)
    assert small_k < 200 * 2 ** 20, small_k


def test_empty_input_gives_empty_jacobian_and_aux():
    J, aux = torch_fwd.jacfwd(lambda x: (x.sum() * torch.ones(2, dtype=x.dtype), 7), has_aux=True)(torch.zeros(0, dtype=D))
    assert J.shape == (2, 0) and aux == 7
