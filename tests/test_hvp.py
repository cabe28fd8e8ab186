"""hvp: forward-over-reverse Hessian-vector products against double backward."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import torch_fwd
from examples.models import ResNet

D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


def double_backward(f, primals, tangents):
    ps = [p.detach().requires_grad_() for p in primals]
    g = torch.autograd.grad(f(*ps), ps, create_graph=True)
    dot = sum((gi * t).sum() for gi, t in zip(g, tangents))
    return [x.detach() for x in g], [x.detach() for x in torch.autograd.grad(dot, ps)]


def _mlp_loss(head):
    torch.manual_seed(0)
    W1, b1, W2 = rand(6, 16) / 2, rand(16), rand(16, 4) / 2
    y = torch.tensor([0, 3, 1, 2, 2])

    def loss(x, W1, W2):
        h = torch.tanh(x @ W1 + b1)
        z = h @ W2
        if head == "cross_entropy":
            return F.cross_entropy(z, y)
        if head == "log_sigmoid":
            return -F.logsigmoid(z * (2.0 * (y[:, None] == torch.arange(4)) - 1)).mean()
        return F.softplus(z, beta=1.5).pow(2).mean()
    return loss, (rand(5, 6), W1, W2)


@pytest.mark.parametrize("head", ["cross_entropy", "log_sigmoid", "softplus"])
def test_mlp_heads_match_double_backward(head):
    f, primals = _mlp_loss(head)
    tangents = tuple(rand(*p.shape) for p in primals)
    g, hv = torch_fwd.hvp(f, primals, tangents)
    ref_g, ref_hv = double_backward(f, primals, tangents)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b)
    for a, b in zip(hv, ref_hv):
        torch.testing.assert_close(a, b)


def test_chunked_directions_and_finite_differences():
    f, primals = _mlp_loss("softplus")
    V = tuple(rand(3, *p.shape) for p in primals)
    g, hv = torch_fwd.hvp(f, primals, V, chunked=True)
    assert hv[0].shape == (3,) + primals[0].shape
    eps = 1e-6
    for i in range(3):
        v = tuple(x[i] for x in V)
        gp = torch_fwd.hvp(f, tuple(p + eps * t for p, t in zip(primals, v)), v)[0]
        gm = torch_fwd.hvp(f, tuple(p - eps * t for p, t in zip(primals, v)), v)[0]
        for a, b, c in zip(hv, gp, gm):
            torch.testing.assert_close(a[i], (b - c) / (2 * eps), atol=1e-6, rtol=1e-5)


def test_zero_direction_gives_zero_and_inputs_untouched():
    f, primals = _mlp_loss("cross_entropy")
    before = [p.clone() for p in primals]
    _, hv = torch_fwd.hvp(f, primals, tuple(torch.zeros_like(p) for p in primals))
    assert all(torch.equal(h, torch.zeros_like(h)) for h in hv)
    assert all(torch.equal(a, b) for a, b in zip(primals, before))


def test_resnet_with_batch_norm_in_training_mode_hutchinson():
    torch.manual_seed(0)
    model = ResNet(channels=4, classes=3).to(D).train()
    x, y = rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 1])
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(*ps):
        # running statistics update on copies: the loss is a function of the parameters only
        state = dict(zip(names, ps), **{n: b.clone() for n, b in buffers.items()})
        return F.cross_entropy(functional_call(model, state, (x,)), y)

    k = 6
    gen = torch.Generator().manual_seed(1)
    Z = tuple((torch.randint(0, 2, (k,) + p.shape, generator=gen) * 2 - 1).to(D) for p in params)  # Rademacher
    g, hz = torch_fwd.hvp(loss, params, Z, chunked=True)
    estimate = sum((h * z).flatten(1).sum(1) for h, z in zip(hz, Z)).mean()
    ref = []
    for i in range(k):
        _, hv = double_backward(loss, params, [z[i] for z in Z])
        ref.append(sum((h * z[i]).sum() for h, z in zip(hv, Z)))
        for a, b in zip(hz, hv):
            torch.testing.assert_close(a[i], b, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(estimate, torch.stack(ref).mean())


def test_attention_block():
    torch.manual_seed(0)
    x = rand(2, 5, 8)
    Wq, Wk, Wv = rand(8, 8) / 3, rand(8, 8) / 3, rand(8, 8) / 3

    def loss(x, Wq, Wk):
        q, k, v = (x @ Wq).view(2, 5, 2, 4).transpose(1, 2), (x @ Wk).view(2, 5, 2, 4).transpose(1, 2), \
            (x @ Wv).view(2, 5, 2, 4).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.layer_norm(o.transpose(1, 2).reshape(2, 5, 8), (8,)).pow(2).sum()
    primals = (x, Wq, Wk)
    tangents = tuple(rand(*p.shape) for p in primals)
    _, hv = torch_fwd.hvp(loss, primals, tangents)
    # PyTorch has no double backward for its fused CPU attention: the reference runs math attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with pytest.raises(RuntimeError, match="derivative for"):
        double_backward(loss, primals, tangents)
    with sdpa_kernel(SDPBackend.MATH):
        _, ref = double_backward(loss, primals, tangents)
    for a, b in zip(hv, ref):
        torch.testing.assert_close(a, b)


def test_errors():
    x = rand(3)
    with pytest.raises(TypeError, match="scalar"):
        torch_fwd.hvp(torch.sin, (x,), (x,))
    with pytest.raises(ValueError, match="shape"):
        torch_fwd.hvp(lambda x: x.sum(), (x,), (rand(4),))
    with pytest.raises(TypeError, match="must be a tuple"):
        torch_fwd.hvp(lambda x: x.sum(), x, x)
    with pytest.raises(NotImplementedError, match="detach"):
        torch_fwd.hvp(lambda x: (x * x.detach()).sum(), (x,), (x,))
