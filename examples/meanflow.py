"""A MeanFlow-style training step (Geng et al., "Mean Flows for One-step Generative
Modeling", 2025) with torch_fwd.JVP.

The network u(z, r, t) predicts the average velocity over [r, t]. MeanFlow trains it on
the identity u(z_t, r, t) = v - (t - r) d/dt u(z_t, r, t), where the total derivative
d/dt u = v . du/dz + du/dt is one JVP along (v, 0, 1) in (z, r, t); the target is not
back-propagated through (stop-gradient), the prediction u is. The velocity network is a
DiT block with default (fused) attention, which torch.func.jvp cannot differentiate.

    python -m examples.meanflow
"""
from __future__ import annotations

import torch
import torch.nn as nn

import torch_fwd
from examples.models import DiTBlock, time_embedding


class MeanFlowNet(nn.Module):
    """u(z, r, t): a DiT block conditioned on t, with (t - r) added through its own
    embedding. z: (B, L, dim) tokens; r, t: (B,) in [0, 1] (embedded unscaled: d/dt of a
    1000-scaled embedding would dominate the target)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.block = DiTBlock(dim, heads, t_scale=1.0)
        self.gap = nn.Linear(dim, dim)

    def forward(self, z, r, t):
        h = z + self.gap(time_embedding(t - r, z.shape[-1], 1.0)).unsqueeze(1)
        return self.block(h, t)


def toy_data(batch, tokens=4, dim=32, generator=None):
    """Two-cluster data: each sample is +-1 on its first half of features, plus noise."""
    sign = torch.randint(0, 2, (batch, 1, 1), generator=generator) * 2 - 1
    x = torch.zeros(batch, tokens, dim)
    x[..., : dim // 2] = 1.0
    return sign * x + 0.1 * torch.randn(batch, tokens, dim, generator=generator)


def meanflow_step(model, jvp_model, opt, x, generator=None):
    """One step: returns (loss, u, du/dt) for inspection."""
    b = x.shape[0]
    e = torch.randn(x.shape, generator=generator)
    t = torch.rand(b, generator=generator)
    r = t * torch.rand(b, generator=generator)  # r <= t
    z = (1 - t)[:, None, None] * x + t[:, None, None] * e
    v = e - x
    u, dudt = jvp_model(z, r, t, tangents=(v, torch.zeros_like(r), torch.ones_like(t)))
    target = (v - (t - r)[:, None, None] * dudt).detach()
    loss = (u - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), u.detach(), dudt.detach()


def main(steps=30, batch=16, seed=0, verbose=True):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MeanFlowNet()
    jvp_model = torch_fwd.JVP(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        loss, _, _ = meanflow_step(model, jvp_model, opt, toy_data(batch, generator=gen), generator=gen)
        losses.append(loss.item())
        if verbose and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  ({torch_fwd.explain()} path)")
    return model, losses


if __name__ == "__main__":
    main()
