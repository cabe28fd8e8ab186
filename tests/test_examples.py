"""The worked examples in examples/ run, and what they compute is right."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_fwd
from examples import forward_gradient, meanflow, ntk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_meanflow_step_matches_torch_func_with_math_attention():
    torch.manual_seed(0)
    model = meanflow.MeanFlowNet()
    jvp_model = torch_fwd.JVP(model)
    gen = torch.Generator().manual_seed(1)
    x = meanflow.toy_data(4, generator=gen)
    b = x.shape[0]
    z, v = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
    t = torch.rand(b, generator=gen)
    r = t * torch.rand(b, generator=gen)
    u, dudt = jvp_model(z, r, t, tangents=(v, torch.zeros_like(r), torch.ones_like(t)))
    with sdpa_kernel(SDPBackend.MATH):
        u_ref, dudt_ref = torch.func.jvp(model, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    torch.testing.assert_close(dudt, dudt_ref, atol=1e-5, rtol=1e-4)
    # the loss's gradient flows through u only (the target is a stop-gradient)
    target = (v - (t - r)[:, None, None] * dudt).detach()
    g = torch.autograd.grad((u - target).pow(2).mean(), list(model.parameters()))
    g_ref = torch.autograd.grad((u_ref - target).pow(2).mean(), list(model.parameters()))
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_meanflow_trains():
    _, losses = meanflow.main(steps=4, batch=4, verbose=False)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_meanflow_under_torchrun_matches_one_process(tmp_path, how):
    """The README's command for a few steps: 2 gloo processes on the CPU train on halves
    of the same global batch; the losses equal one process's on the whole batch."""
    out = tmp_path / "losses.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "examples.meanflow", "--distributed", how, "--steps", "3", "--batch", "8", "--losses", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        log, _ = proc.communicate(timeout=30)
        pytest.fail(f"torchrun did not finish in 240 s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    losses = json.loads(out.read_text())
    _, reference = meanflow.main(steps=3, batch=8, verbose=False)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-4, atol=1e-6)


def test_forward_gradient_directional_derivatives_are_exact_and_training_descends():
    gen = torch.Generator().manual_seed(0)
    x, y = forward_gradient.make_data(64, generator=gen)
    torch.manual_seed(0)
    wrapped = forward_gradient.WithLoss(torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(),
                                                            torch.nn.Linear(16, 3)))
    params = dict(wrapped.named_parameters())
    grads = torch.autograd.grad(wrapped(x, y), list(params.values()))
    before = {n: p.detach().clone() for n, p in params.items()}
    jvp_loss = torch_fwd.JVP(wrapped, wrt="params", chunked=True)
    _, d, directions = forward_gradient.forward_gradient_step(jvp_loss, params, x, y, 5, 0.0, generator=gen)
    exact = sum((g * directions[n]).flatten(1).sum(1) for g, n in zip(grads, params))
    torch.testing.assert_close(d, exact, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(before[n], p) for n, p in params.items())  # lr = 0: untouched
    _, losses = forward_gradient.main(steps=60, verbose=False)
    assert losses[-1] < 0.5 * losses[0]


def test_ntk_block_matches_reverse_mode_jacobians():
    model, x1, x2, theta = ntk.main(chunk=100, verbose=False)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def jac(x):
        j = torch.func.jacrev(lambda p: functional_call(model, p, (x,)))(params)
        return torch.cat([v.flatten(2) for v in j.values()], -1)  # (N, O, P)
    ref = torch.einsum("aop,bqp->aboq", jac(x1), jac(x2))
    torch.testing.assert_close(theta, ref, atol=1e-5, rtol=1e-4)
