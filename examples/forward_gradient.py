"""Forward-gradient training (Baydin et al., "Gradients without Backpropagation", 2022)
with torch_fwd.JVP: no backward pass at all.

For a random direction v over the parameters, the JVP of the loss along v is the
directional derivative d = grad . v, and g = d v is an unbiased estimate of the gradient.
With ``chunked=True`` K directions go through one forward pass and their estimates are
averaged.

    python -m examples.forward_gradient
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_fwd


class WithLoss(nn.Module):
    """The model and its cross-entropy loss as one module: the JVP of the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return F.cross_entropy(self.model(x), y)


def make_data(n=256, dim=10, classes=3, generator=None):
    centers = torch.randn(classes, dim, generator=generator) * 2
    y = torch.randint(0, classes, (n,), generator=generator)
    return centers[y] + torch.randn(n, dim, generator=generator), y


def forward_gradient_step(jvp_loss, params, x, y, k, lr, generator=None):
    """One step with k directions; returns (loss, directional derivatives, directions)."""
    directions = {n: torch.randn((k,) + tuple(p.shape), generator=generator) for n, p in params.items()}
    with torch.no_grad():
        loss, d = jvp_loss(x, y, param_tangents=directions)  # d: (k,), one per direction
        for n, p in params.items():
            g = (d.view((k,) + (1,) * p.dim()) * directions[n]).mean(0)
            p.sub_(lr * g)
    return loss, d, directions


def main(steps=150, k=8, lr=0.05, seed=0, verbose=True):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = make_data(generator=gen)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    wrapped = WithLoss(model)
    jvp_loss = torch_fwd.JVP(wrapped, wrt="params", chunked=True)
    params = dict(wrapped.named_parameters())
    losses = []
    for step in range(steps):
        loss, _, _ = forward_gradient_step(jvp_loss, params, x, y, k, lr, generator=gen)
        losses.append(loss.item())
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return wrapped, losses


if __name__ == "__main__":
    main()
