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


def test_a_blocked_key_with_an_infinite_tangent_moves_nothing():
    # causal: the last key is blocked for every query but the last; its tangent, however
    # large (a padding position), must not reach the other rows' tangents as inf * 0
    q, k, v = qkv(S=5)
    tk = torch.zeros_like(k)
    tk[..., 4, :] = float("inf")
    for path in ("eager", "graph"):
        _, t = torch_fwd.jvp(lambda k: F.scaled_dot_product_attention(q, k, v, is_causal=True), (k,), (tk,), path=path)
        assert (t[..., :4, :] == 0).all(), path
