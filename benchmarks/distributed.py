"""A distributed training step with a JVP in its loss: 2 processes (gloo on the CPU),
DDP and FSDP2, time of a step with the JVP over a step without, torch_fwd against
torch.func.jvp.

    python -m benchmarks.distributed            # writes results/distributed.{md,json}

Each rank trains an MLP on its own batch; a step is forward, loss, backward and an SGD
step. The JVP step's loss adds the squared tangent of the output along a random input
direction (as consistency-model and PINN losses do). The ranks start each timed step
together (a barrier, not timed); rank 0 reports the median over the steps. Ratios are
within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import socket
import statistics
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
WRAPPERS = ("ddp", "fsdp2")
SYSTEMS = ("torch_fwd", "torch.func")


def _model(width, depth):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(width, width) for _ in range(depth)]
    return torch.nn.Sequential(*[m for lin in layers for m in (lin, torch.nn.Tanh())])


def _wrap(model, how):
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    return fully_shard(model)


def _steps(how, width, depth, batch, steps):
    """{system: median seconds of a step} on this rank."""
    import torch_fwd
    model = _wrap(_model(width, depth), how)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(dist.get_rank())
    x, v, y = (torch.randn(batch, width, generator=g) for _ in range(3))

    def plain():
        return (model(x) - y).pow(2).mean()

    def with_jvp(jvp):
        def loss():
            out, t = jvp(lambda a: model(a), (x,), (v,))
            return (out - y).pow(2).mean() + t.pow(2).mean()
        return loss

    losses = {"primal": plain, "torch_fwd": with_jvp(torch_fwd.jvp), "torch.func": with_jvp(torch.func.jvp)}
    times = {name: [] for name in losses}
    for i in range(steps + 2):  # two warm-up rounds (captures, FSDP2's lazy init)
        for name, loss in losses.items():  # interleaved: drift hits every system alike
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss().backward()
            opt.step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, torch_fwd.explain()


def _worker(rank, port, args, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        for how in args["wrappers"]:
            try:
                got = _steps(how, args["width"], args["depth"], args["batch"], args["steps"])
                results.put((rank, how, "ok", got))
            except Exception:  # noqa: BLE001 - reported by rank 0's table
                results.put((rank, how, "error", traceback.format_exc()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(width=256, depth=4, batch=64, steps=30, wrappers=WRAPPERS, timeout=600):
    """{wrapper: ({system: seconds}, explain) or an error string}, as rank 0 measured."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    args = dict(width=width, depth=depth, batch=batch, steps=steps, wrappers=list(wrappers))
    procs = [ctx.Process(target=_worker, args=(r, port, args, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < WORLD * len(wrappers) and time.monotonic() < deadline:
            try:
                rank, how, status, value = results.get(timeout=5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            got[(rank, how)] = value if status == "ok" else f"error: {value.strip().splitlines()[-1]}"
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return {how: got.get((0, how), "error: no result (a hang or a crash)") for how in wrappers}


def markdown(meta, rows):
    lines = [f"# Distributed training step with a JVP in the loss ({meta['torch']}, {meta['machine']}, "
             f"{WORLD} gloo processes, 1 thread each)", "",
             f"MLP {meta['depth']} x {meta['width']} (tanh), batch {meta['batch']} per rank, SGD; median of "
             f"{meta['steps']} steps. Ratio: a step with the JVP in the loss over a step without.", "",
             "| wrapper | step without JVP | torch_fwd | ratio | torch.func.jvp | ratio | torch_fwd path |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for how, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {how} | {row} | | | | | |")
            continue
        times, why = row
        base = times["primal"]
        cells = [f"{times[s] * 1e3:.2f} ms | {times[s] / base:.2f}x" for s in SYSTEMS]
        lines.append(f"| {how} | {base * 1e3:.2f} ms | {' | '.join(cells)} | {why.split(':')[0][:60]} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    rows = run(args.width, args.depth, args.batch, args.steps)
    meta = {"torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "width": args.width, "depth": args.depth, "batch": args.batch, "steps": args.steps}
    md = markdown(meta, rows)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "distributed.md"), "w") as fh:
            fh.write(md)
        with open(os.path.join(args.out, "distributed.json"), "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
