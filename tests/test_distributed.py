"""torch_fwd inside DDP and FSDP2 training steps: 2 gloo processes on the CPU.

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
import warnings

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
    return _input_jvp_step(ddp, lambda: _grads(net), net, rank, **options)


def _input_jvp_step(forward, grads, ref, rank, **options):
    """One training step with torch_fwd.jvp of ``forward`` (w.r.t. its input) in the loss:
    (``grads()`` after it, the reference gradients of ``ref``, explain())."""
    import torch_fwd
    x, v = _batch(rank)
    out, t = torch_fwd.jvp(lambda a: forward(a), (x,), (v,), **options)
    why = torch_fwd.explain()
    _loss(out, t).backward()
    return grads(), _reference(ref), why


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


# ---------------------------------------------------------------------------------------
# FSDP2: fully_shard per block and at the root
# ---------------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, checkpointed=False):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.checkpointed = checkpointed

    def inner(self, x):
        return torch.tanh(self.lin(x))

    def forward(self, x):
        if self.checkpointed:  # activation checkpointing inside the block
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False) + x
        return self.inner(x) + x


class Deep(torch.nn.Module):
    def __init__(self, checkpointed=False):
        super().__init__()
        self.inp = torch.nn.Linear(3, 8)
        self.blocks = torch.nn.ModuleList([Block(checkpointed), Block(checkpointed)])
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def _deep(dtype=D, checkpointed=False):
    torch.manual_seed(0)
    return Deep(checkpointed).to(dtype)


def _shard(net, **options):
    from torch.distributed.fsdp import fully_shard
    for b in net.blocks:
        fully_shard(b, **options)
    fully_shard(net, **options)
    return net


def _full_grads(net):
    return {n: p.grad.full_tensor() for n, p in net.named_parameters() if p.grad is not None}


def _param_directions(net):
    g = torch.Generator().manual_seed(7)  # the same directions on every rank
    return {n: torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in net.named_parameters()}


def _fsdp_inputs(rank, reshard, checkpointed=False, **options):
    ref = _deep()  # (torch.func.jvp through a checkpoint fails its recomputation check)
    net = _shard(_deep(checkpointed=checkpointed), reshard_after_forward=reshard)
    return _input_jvp_step(net, lambda: _full_grads(net), ref, rank, **options)


def scenario_fsdp2_inputs_resharded(rank, _):
    return _fsdp_inputs(rank, reshard=True)


def scenario_fsdp2_inputs_kept(rank, _):
    return _fsdp_inputs(rank, reshard=False)


def scenario_fsdp2_blocks_reshard_during_backward(rank, _):
    """Each block's parameters are resharded and their gradients reduce-scattered when
    the backward reaches the block's inputs, as without torch_fwd: not all at the end of
    the backward (every block's parameters gathered until then)."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    seen = []
    final = FSDPState._root_post_backward_final_callback

    def recording(state):
        seen.append([g._training_state.name for b in net.blocks for g in b._get_fsdp_state()._fsdp_param_groups])
        return final(state)
    ref = _deep()
    net = _shard(_deep(), reshard_after_forward=True)
    FSDPState._root_post_backward_final_callback = recording
    try:
        result = _input_jvp_step(net, lambda: _full_grads(net), ref, rank)
    finally:
        FSDPState._root_post_backward_final_callback = final
    assert seen == [["POST_BACKWARD", "POST_BACKWARD"]], seen
    return result


def scenario_fsdp2_compiled(rank, _):
    return _fsdp_inputs(rank, reshard=True, compile=True)


def scenario_fsdp2_checkpointed_blocks(rank, _):
    return _fsdp_inputs(rank, reshard=True, checkpointed=True)


def _fsdp_params(rank, as_dtensor, reshard=True):
    import torch_fwd
    ref = _deep()
    net = _shard(_deep(), reshard_after_forward=reshard)
    tangents = _param_directions(ref)
    given = tangents
    if as_dtensor:  # sharded as the parameter is
        from torch.distributed.tensor import distribute_tensor
        params = dict(net.named_parameters())
        given = {n: distribute_tensor(t, params[n].device_mesh, params[n].placements) for n, t in tangents.items()}
    x, _ = _batch(rank)
    out, t = torch_fwd.JVP(net, wrt="params")(x, param_tangents=given)
    why = torch_fwd.explain()
    _loss(out, t).backward()
    return _full_grads(net), _reference(ref, param_tangents=tangents), why


def scenario_fsdp2_param_tangents_full(rank, _):
    return _fsdp_params(rank, as_dtensor=False)


def scenario_fsdp2_param_tangents_dtensor(rank, _):
    return _fsdp_params(rank, as_dtensor=True, reshard=False)


def scenario_fsdp2_mixed_precision(rank, _):
    """param_dtype bfloat16, reduce_dtype float32: against torch.func.jvp on a bfloat16 copy
    of the unsharded module, each rank's batch in bfloat16, gradients averaged in float32
    (bf16 rounding differs between the two rule sets and the reductions: compared
    loosely). (torch.func.jvp through the sharded module itself fails on torch 2.12.)"""
    import torch_fwd
    from torch.distributed.fsdp import MixedPrecisionPolicy
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    net = _shard(_deep(torch.float32), mp_policy=policy)
    x, v = (a.float() for a in _batch(rank))
    out, t = torch_fwd.jvp(lambda a: net(a), (x,), (v,))
    assert out.dtype == t.dtype == torch.bfloat16, (out.dtype, t.dtype)
    why = torch_fwd.explain()
    _loss(out.float(), t.float()).backward()
    ref = _deep(torch.bfloat16)
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in ref.named_parameters()}
    for r in range(WORLD):
        ref.zero_grad()
        rx, rv = (a.to(torch.bfloat16) for a in _batch(r))
        rout, rt = torch.func.jvp(ref, (rx,), (rv,))
        _loss(rout.float(), rt.float()).backward()
        for n, p in ref.named_parameters():
            grads[n] += p.grad.float() / WORLD
    return _full_grads(net), grads, why


def scenario_fsdp2_steps(rank, _):
    """20 optimizer steps with the JVP in the loss: parameters equal to a single-process
    run's after them (nothing stale after a step), the module resharded after each step
    (sharded parameters registered, nothing gathered left) and the number of live tensors
    flat."""
    import gc

    import torch_fwd
    ref = _deep()
    net = _shard(_deep(), reshard_after_forward=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    live = []
    for step in range(20):
        x, v = _batch(rank, step)
        out, t = torch_fwd.jvp(lambda a: net(a), (x,), (v,))
        _loss(out, t).backward()
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for r in range(WORLD):
            rx, rv = _batch(r, step)
            rout, rt = torch.func.jvp(ref, (rx,), (rv,))
            (_loss(rout, rt) / WORLD).backward()
        ref_opt.step()
        kinds = {type(p).__name__ for p in net.parameters()}
        assert kinds == {"DTensor"}, f"step {step}: parameters left {kinds}"
        gc.collect()
        with warnings.catch_warnings():  # (isinstance on deprecated module attributes warns)
            warnings.simplefilter("ignore")
            live.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    assert max(live[2:]) == min(live[2:]), f"live tensors grow over the steps: {live}"
    params = {n: p.full_tensor() for n, p in net.named_parameters()}
    return params, dict(ref.named_parameters()), torch_fwd.explain()


def refused_fsdp2_placements(rank, _):
    """A DTensor tangent with other placements than its parameter's."""
    import torch_fwd
    from torch.distributed.tensor import Replicate, distribute_tensor
    net = _shard(_deep())
    p = net.inp.weight
    bad = distribute_tensor(torch.ones(p.shape, dtype=D), p.device_mesh, [Replicate()])
    x, _ = _batch(rank)
    return _error_of(lambda: torch_fwd.JVP(net, wrt=["inp.weight"])(x, param_tangents={"inp.weight": bad}))


def refused_fsdp2_ranks_differ(rank, _):
    """Rank 1 passes a tangent for one more parameter than rank 0: an error on both
    ranks, not a hang in mismatched collectives."""
    import torch_fwd
    net = _shard(_deep())
    tangents = {n: torch.ones(p.shape, dtype=D) for n, p in _deep().named_parameters()}
    given = {"inp.weight": tangents["inp.weight"]}
    if rank == 1:
        given["out.bias"] = tangents["out.bias"]
    x, _ = _batch(rank)
    return _error_of(lambda: torch_fwd.JVP(net, wrt="params")(x, param_tangents=given))


def refused_fsdp1(rank, _):
    """FSDP1 (FullyShardedDataParallel) ran forward with wrong bookkeeping and failed in
    backward; it is refused by name."""
    import torch_fwd
    from torch.distributed.fsdp import FullyShardedDataParallel
    net = FullyShardedDataParallel(_deep(), device_id=torch.device("cpu"))
    x, v = _batch(rank)
    return _error_of(lambda: torch_fwd.jvp(lambda a: net(a), (x,), (v,)))


# ---------------------------------------------------------------------------------------
# tensor parallel: a 2-rank DTensor mesh, ColwiseParallel then RowwiseParallel
# ---------------------------------------------------------------------------------------

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(4, 8)
        self.down = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class Attention(torch.nn.Module):
    """Self-attention whose heads split over the ranks (each rank's q, k, v projections
    give its own heads: -1 in the view), then the output projection summed over them."""

    def __init__(self, dim=8, head_dim=2):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (f(x).view(B, L, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, L, -1))


def _tp(kind):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    torch.manual_seed(0)
    net = (MLP() if kind == "mlp" else Attention()).double()
    ref = copy.deepcopy(net)
    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()} if kind == "mlp" else \
        {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel()}
    return parallelize_module(net, init_device_mesh("cpu", (WORLD,)), plan), ref


def _tp_input(kind, rank):
    g = torch.Generator().manual_seed(3)  # tensor parallel: the same input on every rank
    shape = (3, 4) if kind == "mlp" else (2, 5, 8)
    return torch.randn(shape, dtype=D, generator=g), torch.randn((3,) + shape, dtype=D, generator=g)


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)  # (torch.func.jvp has no rule for the fused kernels)


def _tp_inputs(kind, rank):
    """JVP w.r.t. the input, one direction and K = 3 at once, against torch.func.jvp on the
    unsharded module."""
    import torch_fwd
    net, ref = _tp(kind)
    x, vs = _tp_input(kind, rank)
    with torch.no_grad():
        out, t = torch_fwd.jvp(lambda a: net(a), (x,), (vs[0],))
        why = torch_fwd.explain()
        _, tk = torch_fwd.jvp(lambda a: net(a), (x,), (vs,), chunked=True)
        with _math_sdpa():
            ref_out, ref_t = torch.func.jvp(ref, (x,), (vs[0],))
            ref_tk = torch.stack([torch.func.jvp(ref, (x,), (v,))[1] for v in vs])
    return {"out": out, "tangent": t, "K=3": tk}, {"out": ref_out, "tangent": ref_t, "K=3": ref_tk}, why


def scenario_tp_mlp_inputs(rank, _):
    return _tp_inputs("mlp", rank)


def scenario_tp_attention_inputs(rank, _):
    return _tp_inputs("attention", rank)


def _tp_params(kind, as_dtensor):
    """JVP w.r.t. the (sharded) parameters, tangents given as DTensors with the
    parameters' placements or as full tensors."""
    import torch_fwd
    from torch.distributed.tensor import distribute_tensor
    net, ref = _tp(kind)
    tangents = _param_directions(ref)
    params = dict(net.named_parameters())
    given = {n: distribute_tensor(t, params[n].device_mesh, params[n].placements) for n, t in tangents.items()} \
        if as_dtensor else tangents
    x, _ = _tp_input(kind, 0)
    names = [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        out, t = torch_fwd.JVP(net, wrt="params")(x, param_tangents=given)
        why = torch_fwd.explain()
        with _math_sdpa():
            ref_out, ref_t = torch.func.jvp(lambda *ps: torch.func.functional_call(ref, dict(zip(names, ps)), (x,)),
                                            tuple(dict(ref.named_parameters()).values()),
                                            tuple(tangents[n] for n in names))
    return {"out": out, "tangent": t}, {"out": ref_out, "tangent": ref_t}, why


def scenario_tp_mlp_param_tangents_dtensor(rank, _):
    return _tp_params("mlp", as_dtensor=True)


def scenario_tp_attention_param_tangents_dtensor(rank, _):
    return _tp_params("attention", as_dtensor=True)


def scenario_tp_mlp_param_tangents_full(rank, _):
    return _tp_params("mlp", as_dtensor=False)


def scenario_functional_collectives(rank, _):
    """Each collective DTensor may run, on values with tangents (one direction and K = 3):
    linear, so the tangent of collective(a * a) is collective(2 a v)."""
    import torch_fwd
    import torch.distributed._functional_collectives as fc
    group = dist.group.WORLD
    ops = {
        "all_reduce": lambda y: fc.all_reduce(y, "sum", group),
        "all_reduce_avg": lambda y: fc.all_reduce(y, "avg", group),
        "all_gather": lambda y: getattr(fc, "all_gather_single", fc.all_gather_tensor)(y, 0, group),
        "reduce_scatter": lambda y: getattr(fc, "reduce_scatter_single", fc.reduce_scatter_tensor)(y, "sum", 0, group),
        "all_to_all": lambda y: fc.all_to_all_single(y, None, None, group),
        "broadcast": lambda y: fc.broadcast(y, 1, group),
    }
    g = torch.Generator().manual_seed(rank)  # different values on each rank
    x, vs = torch.randn(4, 3, dtype=D, generator=g), torch.randn(3, 4, 3, dtype=D, generator=g)
    got, want = {}, {}
    for name, op in ops.items():
        with torch.no_grad():
            out, t = torch_fwd.jvp(lambda a: op(a * a) * 1.0, (x,), (vs[0],))
            _, tk = torch_fwd.jvp(lambda a: op(a * a) * 1.0, (x,), (vs,), chunked=True)
        got[name], got[name + " K=3"], got[name + " out"] = t, tk, out
        want[name], want[name + " out"] = op(2 * x * vs[0]) * 1.0, op(x * x) * 1.0
        want[name + " K=3"] = torch.stack([op(2 * x * v) * 1.0 for v in vs])
    return got, want, torch_fwd.explain()


def refused_all_reduce_max(rank, _):
    import torch_fwd
    import torch.distributed._functional_collectives as fc
    x = torch.randn(3, dtype=D)
    return _error_of(lambda: torch_fwd.jvp(lambda a: fc.all_reduce(a, "max", dist.group.WORLD) * 1.0, (x,), (x,)))


def refused_tp_placements(rank, _):
    import torch_fwd
    from torch.distributed.tensor import Replicate, distribute_tensor
    net, _ = _tp("mlp")
    p = net.up.weight  # Shard(0)
    bad = distribute_tensor(torch.ones(p.shape, dtype=D), p.device_mesh, [Replicate()])
    x, _ = _tp_input("mlp", rank)
    with torch.no_grad():
        return _error_of(lambda: torch_fwd.JVP(net, wrt=["up.weight"])(x, param_tangents={"up.weight": bad}))


def refused_tp_ranks_differ(rank, _):
    import torch_fwd
    net, ref = _tp("mlp")
    given = {"up.weight": torch.ones(ref.up.weight.shape, dtype=D)}
    if rank == 1:
        given["down.bias"] = torch.ones(ref.down.bias.shape, dtype=D)
    x, _ = _tp_input("mlp", rank)
    with torch.no_grad():
        return _error_of(lambda: torch_fwd.JVP(net, wrt="params")(x, param_tangents=given))


def refused_tp_autograd(rank, _):
    """In grad mode the JVP would run below DTensor's autograd: refused, not a gradient
    that silently misses the JVP."""
    import torch_fwd
    net, _ = _tp("mlp")
    x, vs = _tp_input("mlp", rank)
    return _error_of(lambda: torch_fwd.jvp(lambda a: net(a), (x,), (vs[0],)))


def _error_of(call):
    try:
        call()
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        return {}, {}, f"{type(e).__name__}: {e}"
    return {}, {}, "no error"


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}
REFUSALS = {name[len("refused_"):]: fn for name, fn in globals().items() if name.startswith("refused_")}
TOLERANCE = {"fsdp2_mixed_precision": dict(atol=3e-2, rtol=3e-2)}
PER_RANK = {"functional_collectives"}  # results that differ between the ranks


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
def test_equal_to_a_single_process(ddp_results, name):
    per_rank = []
    for rank in range(WORLD):
        assert (rank, name) in ddp_results, f"rank {rank} did not report {name} (a hang or a crash)"
        status, grads, ref, why = ddp_results[(rank, name)]
        assert status == "ok", f"rank {rank}:\n{grads}"
        assert set(grads) == set(ref), f"parameters with gradients: {sorted(grads)} against {sorted(ref)}"
        for k in ref:
            torch.testing.assert_close(torch.tensor(grads[k]), torch.tensor(ref[k]), **TOLERANCE.get(name, {}),
                                       msg=lambda m: f"rank {rank}, {k} ({why[:60]}): {m}")
        per_rank.append(grads)
    if name not in PER_RANK:
        for k in per_rank[0]:  # all-reduced or replicated: the same on every rank
            assert per_rank[0][k] == per_rank[1][k], k


@pytest.mark.parametrize("name, expected", [
    ("fsdp2_placements", ["ValueError", "param_tangents['inp.weight']", "Replicate", "Shard(dim=0)"]),
    ("fsdp2_ranks_differ", ["ValueError", "ranks pass different param_tangents"]),
    ("fsdp1", ["NotImplementedError", "FullyShardedDataParallel (FSDP1) is not supported", "fully_shard"]),
    ("all_reduce_max", ["NotImplementedError", "all_reduce with reduce_op='max'"]),
    ("tp_placements", ["ValueError", "tangent DTensor has placements (Replicate(),)", "primal has (Shard(dim=0),)"]),
    ("tp_ranks_differ", ["ValueError", "ranks pass different tangents"]),
    ("tp_autograd", ["NotImplementedError", "autograd through DTensors (tensor parallel)", "torch.no_grad()"]),
])
def test_bad_input_is_refused_on_every_rank(ddp_results, name, expected):
    for rank in range(WORLD):
        assert (rank, name) in ddp_results, f"rank {rank} did not report {name} (a hang or a crash)"
        status, _, _, why = ddp_results[(rank, name)]
        assert status == "ok", why
        for part in expected:
            assert part in why, f"rank {rank}: {part!r} not in {why!r}"
