"""An empirical neural tangent kernel block with chunked parameter tangents.

Theta(x1, x2) = J(x1) J(x2)^T with J = d f / d theta. Forward mode gives J column by
column: K basis directions over the flattened parameters at once (``chunked=True``), so
only a (K, N, outputs) slice of each Jacobian exists at a time and the block accumulates
over chunks. Peak memory is set by K, not by the number of parameters.

    python -m examples.ntk
"""
from __future__ import annotations

import torch
import torch.nn as nn

import torch_fwd


def empirical_ntk(model, x1, x2, chunk=64):
    """Theta[a, b, i, j] = sum_theta df_i(x1_a)/dtheta df_j(x2_b)/dtheta, shape (N1, N2, O, O)."""
    jvp_model = torch_fwd.JVP(model, wrt="params", chunked=True)
    params = dict(model.named_parameters())
    sizes = {n: p.numel() for n, p in params.items()}
    total = sum(sizes.values())
    theta = None
    with torch.no_grad():
        for start in range(0, total, chunk):
            k = min(chunk, total - start)
            tangents, offset = {}, 0
            for n, p in params.items():
                t = torch.zeros(k, sizes[n], dtype=p.dtype)
                lo, hi = max(start, offset), min(start + k, offset + sizes[n])
                if lo < hi:
                    t[torch.arange(lo - start, hi - start), torch.arange(lo - offset, hi - offset)] = 1
                    tangents[n] = t.view((k,) + tuple(p.shape))
                offset += sizes[n]
            _, j1 = jvp_model(x1, param_tangents=tangents)  # (k, N1, O): k columns of J(x1)
            _, j2 = jvp_model(x2, param_tangents=tangents)
            block = torch.einsum("kao,kbp->abop", j1, j2)
            theta = block if theta is None else theta + block
    return theta


def main(chunk=64, seed=0, verbose=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 2))
    x1, x2 = torch.randn(6, 5), torch.randn(4, 5)
    theta = empirical_ntk(model, x1, x2, chunk=chunk)
    if verbose:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"NTK block {tuple(theta.shape)} over {n_params} parameters, {chunk} directions per pass")
        print(theta[..., 0, 0])
    return model, x1, x2, theta


if __name__ == "__main__":
    main()
