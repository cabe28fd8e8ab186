"""scaled_dot_product_attention on every CPU backend (torch.func.jvp raises on the fused one)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_fwd
from torch_fwd.testing import check_frule

D = torch.float64


def qkv(h=2, hk=2, L=5, S=6, e=8):
    return torch.randn(2, h, L, e, dtype=D), torch.randn(2, hk, S, e, dtype=D), torch.randn(2, hk, S, e, dtype=D)


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
@pytest.mark.parametrize("variant", ["plain", "causal", "float_mask", "bool_mask"])
def test_backends(backend, variant):
    mask = {"float_mask": torch.randn(5, 6, dtype=D), "bool_mask": torch.rand(5, 6) > 0.2}.get(variant)

    def f(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=variant == "causal")
    q, k, v = qkv(S=5 if variant == "causal" else 6)
    check_frule(f, q, k, v, paths=("eager", "graph"), check_torch_func=backend == SDPBackend.MATH)


def test_torch_func_fails_where_we_do_not():
    q, k, v = (t.float() for t in qkv())
    with pytest.raises(Exception):
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q, k, v))
    out, t = torch_fwd.jvp(F.scaled_dot_product_attention, (q, k, v), (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        _, ref = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q, k, v))
    torch.testing.assert_close(t, ref, atol=1e-4, rtol=1e-4)


def test_dropout_inside_attention_uses_one_mask():
    q, k, v = qkv()
    torch.manual_seed(0)
    out, t = torch_fwd.jvp(lambda v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5), (v,), (v,), path="eager")
    # linear in v: the tangent along v equals the output itself when primal and tangent share the mask
    torch.testing.assert_close(t, out)


def _variant(name):
    """(f's keyword arguments, kv heads) of one attention variant, float32."""
    return {"plain": ({}, 2), "causal": ({"is_causal": True}, 2), "gqa": ({"enable_gqa": True}, 1),
            "bool_mask": ({"attn_mask": torch.rand(5, 6) > 0.2}, 2),
            "float_mask": ({"attn_mask": torch.randn(5, 6)}, 2)}[name]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "causal", "gqa", "bool_mask", "float_mask"])
@pytest.mark.parametrize("moving", ["qkv", "q"])
def test_traced_for_inductor_the_cpu_attention_tangent_is_one_opaque_call(k, variant, moving):
    # Inductor would write the tangent's math as ~6 C++ kernels, each a g++ compile (the
    # transformer block compiled in 2.4x its primal's time); ATen runs it as fast
    from torch_fwd import triton_kernels
    kwargs, hk = _variant(variant)
    q, kk, v = (t.float() for t in qkv(hk=hk, S=5 if variant == "causal" else 6))

    def attention(kk, v, mask=kwargs.get("attn_mask")):
        kw = dict(kwargs, attn_mask=mask) if "attn_mask" in kwargs else kwargs
        if moving == "q":
            return lambda q: F.scaled_dot_product_attention(q, kk, v, **kw)
        return lambda q, kk, v: F.scaled_dot_product_attention(q, kk, v, **kw)
    f, primals = attention(kk, v), ((q,) if moving == "q" else (q, kk, v))
    m = kwargs.get("attn_mask")
    f64 = attention(kk.double(), v.double(), m.double() if m is not None and m.is_floating_point() else m)
    with triton_kernels.for_inductor():
        opaque = torch_fwd.make_jvp_graph(f, *primals, chunk=k, for_autograd=False)
        for_autograd = torch_fwd.make_jvp_graph(f, *primals, chunk=k, for_autograd=True)
    plain = torch_fwd.make_jvp_graph(f, *primals, chunk=k, for_autograd=False)
    assert "torch_fwd.attention_tangent" in opaque.code and "softmax" not in opaque.code
    # autograd cannot differentiate the opaque call (an HVP back-propagates the tangents)
    assert "torch_fwd.attention_tangent" not in for_autograd.code
    assert "torch_fwd.attention_tangent" not in plain.code
    tangents = [torch.randn((k,) + p.shape) for p in primals]
    got, want = opaque(*primals, *tangents), plain(*primals, *tangents)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # and against float64 finite differences, each direction
    for i in range(k):
        d = [t[i].double() for t in tangents]
        p64 = [p.double() for p in primals]
        h = 1e-6
        fd = (f64(*[p + h * t for p, t in zip(p64, d)]) - f64(*[p - h * t for p, t in zip(p64, d)])) / (2 * h)
        torch.testing.assert_close(got[1][i].double(), fd, atol=1e-4, rtol=1e-4)


def test_the_opaque_attention_tangent_is_not_used_outside_inductor():
    q, kk, v = (t.float() for t in qkv())
    code = torch_fwd.make_jvp_graph(F.scaled_dot_product_attention, q, kk, v, chunk=2, for_autograd=False).code
    assert "torch_fwd.attention_tangent" not in code and "_softmax" in code
