"""torch_fwd.JVP: the nn.Module wrapper, on small models and on real architectures (random
weights from configs), against torch.func.jvp (math attention) and finite differences."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_fwd
from examples.models import DiTBlock, ResNet

D = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=D)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def _func_jvp_params(m, x, pt):
    names = list(pt)
    params = {n: p.detach() for n, p in m.named_parameters()}

    def f(*ps):
        return functional_call(m, {**params, **dict(zip(names, ps))}, (x,))
    return torch.func.jvp(f, tuple(params[n] for n in names), tuple(pt[n] for n in names))[1]


@pytest.mark.parametrize("path", ["graph", "eager"])
def test_wrt_inputs_params_both_and_names(path):
    m = _mlp()
    x, v = rand(5, 4), rand(5, 4)
    pt = {n: rand(*p.shape) for n, p in m.named_parameters()}
    with torch.no_grad():
        out, t = torch_fwd.JVP(m, path=path)(x, tangents=(v,))
        torch.testing.assert_close(out, m(x))
        torch.testing.assert_close(t, torch.func.jvp(m, (x,), (v,))[1])
        _, tp = torch_fwd.JVP(m, wrt="params", path=path)(x, param_tangents=pt)
        torch.testing.assert_close(tp, _func_jvp_params(m, x, pt))
        _, tb = torch_fwd.JVP(m, wrt="both", path=path)(x, tangents=(v,), param_tangents=pt)
        torch.testing.assert_close(tb, t + tp)
        some = {"2.weight": pt["2.weight"]}
        _, ts = torch_fwd.JVP(m, wrt=["2.weight", "0.bias"], path=path)(x, param_tangents=some)
        torch.testing.assert_close(ts, _func_jvp_params(m, x, some))


def test_chunked_param_tangents():
    m = _mlp()
    x = rand(5, 4)
    pt = {n: rand(3, *p.shape) for n, p in m.named_parameters()}
    with torch.no_grad():
        _, t = torch_fwd.JVP(m, wrt="params", chunked=True)(x, param_tangents=pt)
    assert t.shape == (3, 5, 3)
    for k in range(3):
        torch.testing.assert_close(t[k], _func_jvp_params(m, x, {n: v[k] for n, v in pt.items()}))


def test_is_an_nn_module_of_the_wrapped_one():
    m = _mlp()
    J = torch_fwd.JVP(m)
    assert set(J.state_dict()) == set(m.state_dict())
    J.load_state_dict({k: torch.zeros_like(v) for k, v in m.state_dict().items()})
    assert all(torch.equal(p, torch.zeros_like(p)) for p in m.parameters())
    J.to(torch.float32)
    assert m[0].weight.dtype == torch.float32
    J.eval()
    assert not m.training
    calls = []
    h = m[1].register_forward_hook(lambda mod, inp, out: calls.append(1) or out * 2)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        m.load_state_dict(_mlp().float().state_dict())
        _, t = J(x, tangents=(v,))
    h.remove()
    assert calls, "the wrapped module's forward hook did not run"

    def hooked(x):
        return m[2](m[1](m[0](x)) * 2)
    torch.testing.assert_close(t, torch.func.jvp(hooked, (x,), (v,))[1])


def test_no_grad_inference_mode_and_backprop():
    m = _mlp()
    x, v = rand(5, 4), rand(5, 4)
    with torch.inference_mode():
        _, t_inf = torch_fwd.JVP(m)(x, tangents=(v,))
    with torch.no_grad():
        _, t_ng = torch_fwd.JVP(m)(x, tangents=(v,))
    torch.testing.assert_close(t_inf, t_ng)
    # back-propagating the primal and the tangent (the loss of a JVP-regularised model)
    out, t = torch_fwd.JVP(m)(x, tangents=(v,))
    loss = out.pow(2).sum() + t.pow(2).sum()
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref_m = copy.deepcopy(m)
    o2, t2 = torch.func.jvp(ref_m, (x,), (v,))
    ref = torch.autograd.grad(o2.pow(2).sum() + t2.pow(2).sum(), list(ref_m.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_batch_norm_training_updates_buffers_like_the_primal_and_dropout_shares_its_mask():
    torch.manual_seed(0)
    net = nn.Sequential(ResNet(channels=4, classes=6), nn.Dropout(0.3)).to(D).train()
    ref = copy.deepcopy(net)
    x, v = rand(4, 1, 6, 6), rand(4, 1, 6, 6)
    with torch.no_grad():
        torch.manual_seed(7)
        out, t = torch_fwd.JVP(net)(x, tangents=(v,))
        torch.manual_seed(7)
        ref_out = ref(x)
    torch.testing.assert_close(out, ref_out)
    for (n, b), (_, rb) in zip(net.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), n  # updated once, exactly as the primal forward did
    # the tangent is the derivative of that very forward (same dropout mask, batch statistics)
    eps = 1e-6

    def f(z):
        torch.manual_seed(7)
        return copy.deepcopy(ref)(z)
    with torch.no_grad():
        fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(t, fd, atol=1e-6, rtol=1e-5)


def test_dit_block_along_v_and_one():
    torch.manual_seed(0)
    blk = DiTBlock().to(D).eval()
    x, t = rand(2, 6, 32), torch.rand(2, dtype=D)
    v, one = rand(2, 6, 32), torch.ones(2, dtype=D)
    with torch.no_grad():
        out, tout = torch_fwd.JVP(blk)(x, t, tangents=(v, one))
        with pytest.raises(NotImplementedError):
            torch.func.jvp(blk, (x, t), (v, one))  # fused attention: torch.func cannot
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.func.jvp(blk, (x, t), (v, one))[1]
        eps = 1e-6
        fd = (blk(x + eps * v, t + eps) - blk(x - eps * v, t - eps)) / (2 * eps)
    torch.testing.assert_close(tout, ref)
    torch.testing.assert_close(tout, fd, atol=1e-6, rtol=1e-5)


transformers = pytest.importorskip("transformers")


def _hf(name):
    T = transformers
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64)
    if name == "gpt2":
        m = T.GPT2Model(T.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0))
    elif name == "llama":
        m = T.LlamaModel(T.LlamaConfig(num_key_value_heads=2, vocab_size=100, max_position_embeddings=32, **small))
    elif name == "bert":
        m = T.BertModel(T.BertConfig(vocab_size=100, max_position_embeddings=32, **small))
    else:
        m = T.ViTModel(T.ViTConfig(image_size=16, patch_size=4, num_channels=3, **small))
    return m.to(D).eval()


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit"])
def test_hugging_face_models_with_default_attention(name):
    m = _hf(name)
    assert m.config._attn_implementation == "sdpa"
    if name == "vit":
        key, x = "pixel_values", rand(2, 3, 16, 16)
    else:
        key, x = "inputs_embeds", rand(2, 8, 32)
    v = torch.randn_like(x)
    with torch.no_grad():
        out, tout = torch_fwd.JVP(m)(**{key: x}, tangents={key: v})
        assert torch_fwd.explain() == "graph"
        f = lambda z: m(**{key: z}).last_hidden_state  # noqa: E731
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.func.jvp(f, (x,), (v,))[1]
        # Llama's RMSNorm computes in float32 even for a float64 model: its differences carry
        # float32 rounding, best at a larger step
        eps, tol = (1e-3, 1e-3) if name == "llama" else (1e-6, 1e-5)
        fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(out.last_hidden_state, f(x))
    torch.testing.assert_close(tout.last_hidden_state, ref)
    torch.testing.assert_close(tout.last_hidden_state, fd, atol=tol, rtol=tol)


def test_gpt2_parameter_tangents_from_token_ids():
    m = _hf("gpt2")
    ids = torch.randint(0, 100, (2, 8))
    torch.manual_seed(1)
    pt = {n: torch.randn_like(p) for n, p in m.named_parameters() if "h.1." in n}
    params = {n: p.detach() for n, p in m.named_parameters()}

    def f(*ps):
        return functional_call(m, {**params, **dict(zip(pt, ps))}, (ids,)).last_hidden_state
    with torch.no_grad():
        _, tout = torch_fwd.JVP(m, wrt=list(pt))(ids, param_tangents=pt)
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.func.jvp(f, tuple(params[n] for n in pt), tuple(pt.values()))[1]
    torch.testing.assert_close(tout.last_hidden_state, ref)


def test_errors_are_clear():
    m = _mlp()
    x = rand(2, 4)
    with pytest.raises(TypeError, match="nn.Module"):
        torch_fwd.JVP(lambda x: x)
    with pytest.raises(ValueError, match="wrt"):
        torch_fwd.JVP(m, wrt="weights")
    with pytest.raises(ValueError, match="not parameters"):
        torch_fwd.JVP(m, wrt=["nope"])
    with pytest.raises(ValueError, match="tangents="):
        torch_fwd.JVP(m)(x)
    with pytest.raises(ValueError, match="one entry per positional"):
        torch_fwd.JVP(m)(x, tangents=(x, x))
    with pytest.raises(ValueError, match="param_tangents"):
        torch_fwd.JVP(m, wrt="params")(x)
    with pytest.raises(ValueError, match="not differentiated"):
        torch_fwd.JVP(m, wrt=["0.weight"])(x, param_tangents={"2.weight": torch.zeros(3, 8, dtype=D)})


def test_resnet_eval_mode_matches_torch_func():
    torch.manual_seed(0)
    net = ResNet(channels=4, classes=6).to(D)
    with torch.no_grad():  # running statistics that are not the defaults
        net.train()(rand(8, 1, 6, 6))
    net.eval()
    x, v = rand(3, 1, 6, 6), rand(3, 1, 6, 6)
    with torch.no_grad():
        out, t = torch_fwd.JVP(net)(x, tangents=(v,))
        ref_out, ref = torch.func.jvp(net, (x,), (v,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref)
