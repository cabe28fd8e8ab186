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
