"""laplacian: the forward Laplacian against torch.func.hessian traces and finite differences."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_fwd

D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


def hessian_trace(f, x):
    """Per point (batch dim 0) trace of the Hessian of f's per-point output."""
    return torch.func.vmap(lambda p: torch.func.hessian(lambda q: f(q[None])[0])(p))(x).diagonal(
        dim1=-2, dim2=-1).sum(-1) if x.dim() == 2 else torch.func.hessian(f)(x).diagonal().sum()


def _pinn(d, width=16):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Softplus(),
                        nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1)).to(D)
    return lambda x: net(x).squeeze(-1) + torch.sin(x).prod(-1) + (x * x).sum(-1) * x[..., 0]


@pytest.mark.parametrize("d", [1, 3, 7])
def test_pinn_mlp_batched_points(d):
    f = _pinn(d)
    x = rand(6, d)
    lap, grad = torch_fwd.laplacian(f, x, batch_dims=1, return_gradient=True)
    torch.testing.assert_close(lap, hessian_trace(f, x))
    ref_grad = torch.func.vmap(torch.func.grad(lambda p: f(p[None])[0]))(x)
    torch.testing.assert_close(grad, ref_grad)


def test_generic_and_bilinear_ops_single_point():
    A = rand(4, 4)

    def f(x):
        s = torch.softmax(x, 0)[1] * F.layer_norm(x, (4,)).pow(3).sum()
        q = x @ (A @ x)                       # bilinear, both factors moving
        r = torch.atan2(x[0], x[1] + 3.0) + (x[2] ** 2 + 1) ** x[3] + x[0] / (x[1] ** 2 + 1)
        return s + q + r + torch.logsumexp(x * x[0], 0) + torch.cumprod(x, 0)[-1]
    torch.manual_seed(3)
    x = rand(4)
    torch.testing.assert_close(torch_fwd.laplacian(f, x), hessian_trace(f, x))
    # and against a second difference along each coordinate
    eps = 1e-4
    fd = sum((f(x + eps * e) - 2 * f(x) + f(x - eps * e)) / eps ** 2 for e in torch.eye(4, dtype=D))
    torch.testing.assert_close(torch_fwd.laplacian(f, x), fd, atol=1e-5, rtol=1e-5)


def test_vector_output_per_point_and_grid_coordinates():
    # a field on 2-D coordinates given as a (2, 3) block per point: d = 6
    def f(x):
        return torch.stack([torch.tanh(x).sum((-1, -2)), (x[..., 0, :] * x[..., 1, :]).exp().sum(-1)], -1)
    x = rand(5, 2, 3) * 0.5
    lap = torch_fwd.laplacian(f, x, batch_dims=1)
    assert lap.shape == (5, 2)
    for c in range(2):
        ref = torch.func.vmap(lambda p: torch.func.hessian(lambda q: f(q[None])[0, c])(p))(x)
        torch.testing.assert_close(lap[:, c], ref.reshape(5, 6, 6).diagonal(dim1=-2, dim2=-1).sum(-1))


def test_independent_of_x_and_linear():
    x = rand(3, 4)
    torch.testing.assert_close(torch_fwd.laplacian(lambda x: torch.ones(3, dtype=D), x, batch_dims=1),
                               torch.zeros(3, dtype=D))
    lap, g = torch_fwd.laplacian(lambda x: (x * 2).sum(-1), x, batch_dims=1, return_gradient=True)
    torch.testing.assert_close(lap, torch.zeros(3, dtype=D))
    torch.testing.assert_close(g, torch.full((3, 4), 2.0, dtype=D))


def test_errors():
    x = rand(3, 2)
    with pytest.raises(TypeError, match="callable"):
        torch_fwd.laplacian(3, x)
    with pytest.raises(TypeError, match="floating"):
        torch_fwd.laplacian(torch.sin, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_dims"):
        torch_fwd.laplacian(torch.sin, x, batch_dims=2)
    with pytest.raises(ValueError, match="leading dims"):
        torch_fwd.laplacian(lambda x: x.sum(), x, batch_dims=1)
    with pytest.raises(RuntimeError, match="could not be traced"):
        torch_fwd.laplacian(lambda x: x.sin() if x.sum() > 0 else x.cos(), x)


def test_reused_capture_is_guarded():
    state = {"scale": 2.0, "w": torch.ones(3, dtype=D)}

    def f(x):
        return (x * x * state["w"]).sum(-1) * state["scale"]
    x = rand(4, 3)
    torch.testing.assert_close(torch_fwd.laplacian(f, x, batch_dims=1), torch.full((4,), 12.0, dtype=D))
    state["scale"] = 3.0
    torch.testing.assert_close(torch_fwd.laplacian(f, x, batch_dims=1), torch.full((4,), 18.0, dtype=D))
    state["w"] = torch.tensor([1.0, 0.0, 2.0], dtype=D)
    torch.testing.assert_close(torch_fwd.laplacian(f, x, batch_dims=1), torch.full((4,), 18.0, dtype=D))
    torch.testing.assert_close(torch_fwd.laplacian(f, rand(2, 5, 3), batch_dims=2), torch.full((2, 5), 18.0, dtype=D))
