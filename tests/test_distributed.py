"""torch_fwd inside a DistributedDataParallel training step: 2 gloo processes on the CPU.

Each rank takes its own batch; a loss built from the output and its JVP is
back-propagated, and DDP all-reduces the gradients. They must be equal on both ranks and
equal to a single-process reference: torch.func.jvp on a plain copy of the model, the
gradients of both ranks' losses averaged. Every wait has a timeout and every process is
joined (a hang is a failure)."""
import copy
import datetime
import os
import queue
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
D = torch.float64
TIMEOUT = 240  # seconds for the whole run


class Net(torch.nn.Module):
    """A user-defined module (dynamo compiles its forward as a frame of its own; an
    nn.Sequential's forward, in torch's files, it would not). With ``unused``, a layer
    the forward never reaches (DDP then needs find_unused_parameters)."""

    def __init__(self, unused=False):
        super().__init__()
        self.a = torch.nn.Linear(3, 8)
        self.b = torch.nn.Linear(8, 2)
        if unused:
            self.unused = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _batch(rank, step=0):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 3, dtype=D, generator=g), torch.randn(4, 3, dtype=D, generator=g)


def _loss(out, t):
    return (out ** 2).mean() + (t ** 2).mean() + (out * t).mean()


def _reference(net, steps=(0,), param_tangents=None):
    """Gradients of the loss summed over ``steps`` (micro-batches) and averaged over the
    ranks' batches, by torch.func.jvp on a plain copy."""
    ref = copy.deepcopy(net)
    names = [n for n, _ in ref.named_parameters()]
    for rank in range(WORLD):
        for step in steps:
            x, v = _batch(rank, step)
            if param_tangents is None:
                out, t = torch.func.jvp(ref, (x,), (v,))
            else:
                params = dict(ref.named_parameters())
                out, t = torch.func.jvp(
                    lambda *ps: torch.func.functional_call(ref, dict(zip(names, ps)), (x,)),
                    tuple(params.values()), tuple(param_tangents[n] for n in names))
            (_loss(out, t) / WORLD).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------
# scenarios: each returns (gradients, reference, what torch_fwd.explain() said)
# ---------------------------------------------------------------------------------------

def _fresh(unused=False):
    torch.manual_seed(0)
    return Net(unused).double()


def _jvp_step(net, ddp, rank, **options):
    """One training step with torch_fwd.jvp of the DDP module in the loss."""
    import torch_fwd
    x, v = _batch(rank)
    out, t = torch_fwd.jvp(lambda a: ddp(a), (x,), (v,), **options)
    why = torch_fwd.explain()
    _loss(out, t).backward()
    return _grads(net), _reference(net), why


def scenario_jvp(rank, ddp_cls):
    net = _fresh()
    return _jvp_step(net, ddp_cls(net), rank)


def scenario_JVP_inputs(rank, ddp_cls):
    import torch_fwd
    net = _fresh()
    wrapped = torch_fwd.JVP(ddp_cls(net))
    x, v = _batch(rank)
    out, t = wrapped(x, tangents=(v,))
    why = torch_fwd.explain()
    _loss(out, t).backward()
    return _grads(net), _reference(net), why


def scenario_JVP_params(rank, ddp_cls):
    import torch_fwd
    net = _fresh()
    ddp = ddp_cls(net)
    g = torch.Generator().manual_seed(7)  # the same directions on every rank
    tangents = {n: torch.randn(p.shape, dtype=D, generator=g) for n, p in net.named_parameters()}
    x, _ = _batch(rank)
    out, t = torch_fwd.JVP(ddp, wrt="params")(x, param_tangents={"module." + n: tt for n, tt in tangents.items()})
    why = torch_fwd.explain()
    _loss(out, t).backward()
    return _grads(net), _reference(net, param_tangents=tangents), why


def scenario_compiled(rank, ddp_cls):
    net = _fresh()
    return _jvp_step(net, ddp_cls(net), rank, compile=True)


def scenario_find_unused_parameters(rank, ddp_cls):
    net = _fresh(unused=True)
    return _jvp_step(net, ddp_cls(net, find_unused_parameters=True), rank)


def scenario_static_graph(rank, ddp_cls):
    import torch_fwd
    net = _fresh()
    ddp = ddp_cls(net, static_graph=True)
    for step in range(2):  # static_graph learns the graph on the first step
        net.zero_grad()
        x, v = _batch(rank, step)
        out, t = torch_fwd.jvp(lambda a: ddp(a), (x,), (v,))
        _loss(out, t).backward()
    return _grads(net), _reference(net, steps=(1,)), torch_fwd.explain()


def scenario_no_sync(rank, ddp_cls):
    import torch_fwd
    net = _fresh()
    ddp = ddp_cls(net)
    with ddp.no_sync():  # gradients accumulate locally ...
        x, v = _batch(rank, 0)
        out, t = torch_fwd.jvp(lambda a: ddp(a), (x,), (v,))
        _loss(out, t).backward()
    x, v = _batch(rank, 1)  # ... and are all-reduced with the last micro-batch's
    out, t = torch_fwd.jvp(lambda a: ddp(a), (x,), (v,))
    _loss(out, t).backward()
    return _grads(net), _reference(net, steps=(0, 1)), torch_fwd.explain()


def refused_fsdp2(rank, ddp_cls):
    """FSDP2 is not supported yet: the error says so (it was "resize_() on an invalid
    python storage")."""
    import torch_fwd
    from torch.distributed.fsdp import fully_shard
    net = _fresh()
    fully_shard(net.a)
    fully_shard(net)
    x, v = _batch(rank)
    try:
        torch_fwd.jvp(lambda a: net(a), (x,), (v,))
    except RuntimeError as e:
        return {}, {}, str(e)
    return {}, {}, "no error"


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}
REFUSALS = {"fsdp2": refused_fsdp2}


def _worker(rank, port, names, results):
    from torch.nn.parallel import DistributedDataParallel
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        for name in names:
            try:
                grads, ref, why = {**SCENARIOS, **REFUSALS}[name](rank, DistributedDataParallel)
                results.put((rank, name, "ok", {k: g.tolist() for k, g in grads.items()},
                             {k: g.tolist() for k, g in ref.items()}, why))
            except Exception:  # noqa: BLE001 - reported to the test, which fails
                results.put((rank, name, "error", traceback.format_exc(), None, None))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    names = list(SCENARIOS) + list(REFUSALS)
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, names, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT)
    try:
        while len(got) < WORLD * len(names):
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, name, status, a, b, why = results.get(timeout=min(left, 5))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
                continue
            got[(rank, name)] = (status, a, b, why)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return got


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_training_step_gradients(ddp_results, name):
    per_rank = []
    for rank in range(WORLD):
        assert (rank, name) in ddp_results, f"rank {rank} did not report {name} (a hang or a crash)"
        status, grads, ref, why = ddp_results[(rank, name)]
        assert status == "ok", f"rank {rank}:\n{grads}"
        assert set(grads) == set(ref), f"parameters with gradients: {sorted(grads)} against {sorted(ref)}"
        for k in ref:
            torch.testing.assert_close(torch.tensor(grads[k]), torch.tensor(ref[k]), msg=lambda m: f"rank {rank}, {k} ({why[:60]}): {m}")
        per_rank.append(grads)
    for k in per_rank[0]:  # all-reduced: the same on every rank
        assert per_rank[0][k] == per_rank[1][k], k


def test_fsdp2_is_refused_with_a_clear_error(ddp_results):
    for rank in range(WORLD):
        status, _, _, why = ddp_results[(rank, "fsdp2")]
        assert status == "ok" and "FSDP2" in why and "not supported yet" in why, why
