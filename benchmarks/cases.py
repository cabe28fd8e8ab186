"""Mooncake.jl's benchmark functions ported to PyTorch (shared by tests and benchmarks)."""
import torch


def sum_1000(x):
    return x.sum()


def _sum_1000(x):
    """A Python loop over elements: no capture can keep up with this, the eager path runs."""
    s = torch.zeros((), dtype=x.dtype)
    for i in range(x.shape[0]):
        s = s + x[i]
    return s


def sum_sin_1000(x):
    return torch.sin(x).sum()


def _sum_sin_1000(x):
    s = torch.zeros((), dtype=x.dtype)
    for i in range(x.shape[0]):
        s = s + torch.sin(x[i])
    return s


def kron_sum(a, b):
    return torch.kron(a, b).sum()


def kron_view_sum(a, b):
    # Views by slicing. (kron of a *transposed* input trips a view error inside PyTorch's
    # own kron decomposition under any Python dispatch, make_fx included.)
    return torch.kron(a[1:], b[:, 1:]).sum()


def naive_map_sin_cos_exp(x):
    y = torch.empty_like(x)
    for i in range(x.shape[0]):
        y[i] = torch.sin(x[i]) * torch.cos(x[i]) + torch.exp(x[i])
    return y


def map_sin_cos_exp(x):
    return torch.stack([torch.sin(v) * torch.cos(v) + torch.exp(v) for v in x.unbind(0)])


def broadcast_sin_cos_exp(x):
    return torch.sin(x) * torch.cos(x) + torch.exp(x)


def simple_mlp(W1, W2, x):
    return torch.relu(W2 @ torch.relu(W1 @ x)).sum()


def gp_lml(x, y, log_ell, log_sigma):
    """Exact GP log marginal likelihood, squared-exponential kernel, via Cholesky."""
    n = x.shape[0]
    d2 = (x[:, None] - x[None, :]) ** 2
    K = torch.exp(-0.5 * d2 / torch.exp(2 * log_ell)) + (torch.exp(2 * log_sigma) + 1e-6) * torch.eye(n, dtype=x.dtype)
    L = torch.linalg.cholesky(K)
    alpha = torch.cholesky_solve(y[:, None], L)
    return -0.5 * (y[:, None] * alpha).sum() - torch.log(torch.diagonal(L)).sum() - 0.5 * n * torch.log(
        torch.tensor(2 * torch.pi, dtype=x.dtype))


def large_single_block(x, n_ops=100):
    """A long chain of multiplications reusing values (Mooncake's large_single_block)."""
    a, b = x, x * 1.01
    for i in range(n_ops // 2):
        a, b = a * b, b * 0.999 + a * 1e-3
    return a.sum() + b.sum()


# Functions with graph breaks: dynamo cannot capture them in one graph, so jvp's default
# path runs them region by region. Each is a few layers on either side of the break.

def _layer(W, x):
    return torch.tanh(W @ x) + 0.1 * x


def break_branch(W, x):
    """A branch on a tensor's value."""
    h = _layer(W, _layer(W, x))
    if h.norm() > 1.0:
        h = h / h.norm()
    return _layer(W, _layer(W, h)).sum()


def break_print(W, x):
    """A print (of nothing: the graph break is the point, not the output)."""
    h = _layer(W, _layer(W, x))
    print(end="")
    return _layer(W, _layer(W, h)).sum()


def break_numpy(W, x):
    """A NumPy call on a value."""
    import numpy as np
    h = _layer(W, _layer(W, x))
    scale = float(np.abs(h.detach().numpy()).max())
    return _layer(W, _layer(W, h / scale)).sum()


def break_item(W, x):
    """``.item()`` used as a Python scalar."""
    h = _layer(W, _layer(W, x))
    s = h.abs().max().item()
    return _layer(W, _layer(W, h * (1.0 / s))).sum()


def _fixed_point_step(W, x, h):
    return torch.tanh(W @ h + x)


def iterate_to_tolerance(W, x):
    """The fixed point of h = tanh(W h + x), iterated until the update is small (W is a
    contraction): a loop whose length depends on the values."""
    h = torch.zeros_like(x)
    for _ in range(100):
        h_new = _fixed_point_step(W, x, h)
        if (h_new - h).abs().max() < 1e-6:
            return h_new.sum()
        h = h_new
    return h.sum()
