"""Thread safety: jvp, jacfwd, linearize, hvp, the caches and rule registration, called
from 8 threads at once with different shapes and chunk sizes, give the single-threaded
answers."""
import threading

import torch
import torch.nn.functional as F

import torch_fwd

D = torch.float64
W = torch.linspace(-1, 1, 6 * 6, dtype=D).reshape(6, 6)


def model(x):
    return F.gelu(torch.tanh(x @ W) @ W.T).sum(-1) + torch.logsumexp(x, -1)


def _inputs(i):
    # (a generator of its own: threads seeding the global one race, and a thread could
    # then draw other inputs than the main thread's references)
    g = torch.Generator().manual_seed(i)
    n, k = 2 + i % 3, 1 + i % 4
    return torch.randn(n, 6, dtype=D, generator=g), torch.randn(k, n, 6, dtype=D, generator=g)


def _references(i):
    """Computed in the main thread: torch.func and PyTorch's forward AD keep process-wide
    state (the forward-AD level) and are not safe to run from several threads."""
    x, V = _inputs(i)
    loss = lambda x: model(x).sum()  # noqa: E731
    return {"jvp": torch.stack([torch.func.jvp(model, (x,), (v,))[1] for v in V]),
            "jacfwd": torch.func.jacfwd(model)(x),
            "hvp": torch.autograd.functional.hvp(loss, x, V[0])[1],
            "user rule": torch.cos(x * (i + 1)) * V[0] * (i + 1)}


def _work(i):
    """One thread's calls; returns {name: result}."""
    x, V = _inputs(i)
    k = V.shape[0]
    path = ("auto", "graph", "eager")[i % 3]
    out = {}
    out["jvp"] = torch_fwd.jvp(model, (x,), (V,), chunked=True, path=path)[1]
    out["jacfwd"] = torch_fwd.jacfwd(model, chunk_size=k)(x)
    _, jvp_fn = torch_fwd.linearize(model, x)
    out["linearize"] = jvp_fn(V, chunked=True)
    out["hvp"] = torch_fwd.hvp(lambda x: model(x).sum(), (x,), (V[0],))[1][0]

    # a user rule registered, used and removed while other threads run
    op = _SCALED[i]
    torch_fwd.register_frule(op, lambda p, tt: (op(p[0]), None if tt[0] is None else tt[0] * (i + 1)))
    try:
        out["user rule"] = torch_fwd.jvp(lambda x: op(x).sin(), (x,), (V[0],), path=path)[1]
    finally:
        torch_fwd.unregister_frule(op)
    return out


def _make_scaled(i):
    @torch.library.custom_op(f"torch_fwd_threads::scaled_{i}", mutates_args=())
    def scaled(a: torch.Tensor) -> torch.Tensor:
        return a * (i + 1)

    @scaled.register_fake
    def _(a):
        return torch.empty_like(a)
    return getattr(torch.ops.torch_fwd_threads, f"scaled_{i}").default


_SCALED = [_make_scaled(i) for i in range(8)]


def test_eight_threads_at_once():
    results, errors = {}, []
    barrier = threading.Barrier(8)

    def run(i):
        try:
            barrier.wait()
            for _ in range(2):  # the second round meets warm caches
                results[i] = _work(i)
        except BaseException as e:  # noqa: BLE001
            errors.append((i, e))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not errors, errors
    assert len(results) == 8
    for i, ours in results.items():
        refs = _references(i)
        refs["linearize"] = refs["jvp"]
        for name, ref in refs.items():
            torch.testing.assert_close(ours[name], ref, msg=lambda m, i=i, name=name: f"thread {i}, {name}: {m}")
