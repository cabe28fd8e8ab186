"""Small models the examples (and tests) use: a DiT-style block with adaptive layer norm
conditioned on a time embedding, and a ResNet-style CNN with BatchNorm."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) time, as in DiT (which scales t in [0, 1] by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angles = t[:, None] * scale * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


class DiTBlock(nn.Module):
    """A DiT block: self-attention and an MLP, each behind an adaptive layer norm whose
    shift, scale and gate come from the time embedding (adaLN-Zero, gates not zeroed here
    so that every path moves). Input x: (B, L, dim), t: (B,)."""

    def __init__(self, dim=32, heads=4, t_scale=1000.0):
        super().__init__()
        self.heads, self.t_scale = heads, t_scale
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, t):
        B, L, D = x.shape
        c = self.t_mlp(time_embedding(t, D, self.t_scale))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, -1)
        h = F.layer_norm(x, (D,)) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x = x + gate1 * self.proj(a)
        h = F.layer_norm(x, (D,)) * (1 + scale2) + shift2
        x = x + gate2 * self.mlp(h)
        return self.out(x)


def transformer_block(dim, heads, device=None):
    """A pre-LN transformer block as a function of x (B, L, dim): causal fused attention
    (F.scaled_dot_product_attention) and a GELU MLP, weights drawn from the current seed."""
    Wq, Wk, Wv, Wo = (torch.randn(dim, dim, device=device) / dim ** 0.5 for _ in range(4))
    W1 = torch.randn(dim, 4 * dim, device=device) / dim ** 0.5
    W2 = torch.randn(4 * dim, dim, device=device) / (4 * dim) ** 0.5

    def block(x):
        B, L, _ = x.shape
        h = F.layer_norm(x, (dim,))
        q, k, v = ((h @ w).view(B, L, heads, dim // heads).transpose(1, 2) for w in (Wq, Wk, Wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, dim)
        x = x + a @ Wo
        return x + F.gelu(F.layer_norm(x, (dim,)) @ W1) @ W2
    return block


class _BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    """A ResNet-style CNN: stem, two residual blocks with BatchNorm, global pooling, head."""

    def __init__(self, channels=8, classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(_BasicBlock(channels), _BasicBlock(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))
