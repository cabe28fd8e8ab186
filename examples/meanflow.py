"""A MeanFlow-style training step (Geng et al., "Mean Flows for One-step Generative
Modeling", 2025) with torch_fwd.JVP.

The network u(z, r, t) predicts the average velocity over [r, t]. MeanFlow trains it on
the identity u(z_t, r, t) = v - (t - r) d/dt u(z_t, r, t), where the total derivative
d/dt u = v . du/dz + du/dt is one JVP along (v, 0, 1) in (z, r, t); the target is not
back-propagated through (stop-gradient), the prediction u is. The velocity network is a
DiT block with default (fused) attention, which torch.func.jvp cannot differentiate.

    python -m examples.meanflow
    torchrun --nproc_per_node 2 -m examples.meanflow --distributed fsdp2   # or ddp
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


def meanflow_step(model, jvp_model, opt, x, generator=None, shard=None):
    """One step: returns (loss, u, du/dt) for inspection. ``shard=(rank, world)``: the
    noise and times are drawn for the whole batch ``x`` (the same on every rank), and this
    rank trains on its slice of it; the loss returned is the whole batch's (averaged over
    the ranks), so it equals a single process's on the same batch."""
    b = x.shape[0]
    e = torch.randn(x.shape, generator=generator).to(x.device)
    t = torch.rand(b, generator=generator).to(x.device)
    r = t * torch.rand(b, generator=generator).to(x.device)  # r <= t
    if shard is not None:
        rank, world = shard
        if b % world:
            raise ValueError(f"meanflow_step: the batch ({b}) must split evenly over {world} ranks")
        part = slice(rank * b // world, (rank + 1) * b // world)
        x, e, t, r = x[part], e[part], t[part], r[part]
    z = (1 - t)[:, None, None] * x + t[:, None, None] * e
    v = e - x
    u, dudt = jvp_model(z, r, t, tangents=(v, torch.zeros_like(r), torch.ones_like(t)))
    target = (v - (t - r)[:, None, None] * dudt).detach()
    loss = (u - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    loss = loss.detach()
    if shard is not None:
        torch.distributed.all_reduce(loss)
        loss = loss / shard[1]
    return loss, u.detach(), dudt.detach()


def distribute(model, how):
    """The model wrapped for data parallel training: ``"ddp"`` (DistributedDataParallel)
    or ``"fsdp2"`` (fully_shard on the DiT block, then on the whole model)."""
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.block)
        return fully_shard(model)
    raise ValueError(f"distribute: how must be 'ddp' or 'fsdp2', got {how!r}")


def main(steps=30, batch=16, seed=0, verbose=True, distributed=None, device="cpu"):
    """Train for ``steps`` steps; returns (model, losses). ``distributed``: "ddp" or
    "fsdp2", in a process group already set up (each rank trains on its slice of the same
    global batch of ``batch``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # data and noise drawn on the CPU
    model = MeanFlowNet().to(device)
    shard = None
    if distributed is not None:
        model = distribute(model, distributed)
        shard = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    jvp_model = torch_fwd.JVP(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        x = toy_data(batch, generator=gen).to(device)
        loss, _, _ = meanflow_step(model, jvp_model, opt, x, generator=gen, shard=shard)
        losses.append(loss.item())
        if verbose and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  ({torch_fwd.explain()} path)")
    return model, losses


def _cli():
    import argparse
    import json
    parser = argparse.ArgumentParser(description="MeanFlow training with torch_fwd.JVP in the loss")
    parser.add_argument("--distributed", choices=["ddp", "fsdp2"], default=None,
                        help="data parallel over the processes torchrun starts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the ranks)")
    parser.add_argument("--losses", default=None, help="write the losses to this JSON file (rank 0)")
    a = parser.parse_args()
    rank = 0
    if a.distributed is None:
        _, losses = main(a.steps, a.batch)
    else:
        import os

        import torch.distributed as dist
        device = "cpu"
        if torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
        rank = dist.get_rank()
        try:
            _, losses = main(a.steps, a.batch, verbose=rank == 0, distributed=a.distributed, device=device)
            dist.barrier()  # every rank done with its collectives before the group goes
        finally:
            dist.destroy_process_group()
    if a.losses and rank == 0:
        with open(a.losses, "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    _cli()
