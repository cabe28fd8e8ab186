"""Every Triton kernel against its reference (the rule's own PyTorch math, in float64), on
small odd shapes, non-contiguous inputs, K = 1 and K > 1, each dtype; then the whole path
from torch_fwd.jvp to the kernels. Without a GPU the kernels run on Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1 before triton is imported), on CPU tensors, switched
on with TORCH_FWD_TRITON_ON_CPU=1."""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import torch_fwd  # noqa: E402
from torch_fwd import triton_kernels  # noqa: E402
from torch_fwd.triton_kernels import attention, elementwise, rowwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off (triton was imported before conftest set it)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def kernels_on_cpu(monkeypatch):
    monkeypatch.setenv("TORCH_FWD_TRITON_ON_CPU", "1")
    # (the switch is read once: read again now, and as it was after the test)
    monkeypatch.setattr(triton_kernels, "_cpu_switch", [])
    assert triton_kernels.use_kernels(torch.zeros(1, device=DEVICE))


def rand(*shape, dtype=torch.float32, positive=False):
    x = torch.randn(*shape, dtype=dtype, device=DEVICE)
    return x.abs() + 0.2 if positive else x


def close(a, b, dtype, scale=1.0):
    a, b = a.double(), b.double()
    tol = TOL[dtype] * scale
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"max abs error {(a - b).abs().max().item():.3g}"


def d(x):
    return None if x is None else x.double()


# ---- elementwise ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(elementwise.UNARY))
def test_unary(op, dtype):
    p0, p1 = {"softplus": (2.0, 1.5), "elu": (0.7, 0.0)}.get(op, (0.0, 0.0))
    for k in (1, 3):
        x = rand(9, 13, dtype=dtype, positive=op == "log").t()  # non-contiguous, odd sizes
        t = rand(k, 13, 9, dtype=dtype)
        y, ty = elementwise.unary_jvp(x, t, op, p0, p1)
        ry, rty = elementwise.unary_reference(d(x), d(t), op, p0, p1)
        close(y, ry, dtype)
        close(ty, rty, dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", [False, True], ids=["mul", "div"])
@pytest.mark.parametrize("shapes", [((5, 1, 7), (3, 1)), ((2, 3, 4, 5), (5,)), ((7,), (7,))], ids=str)
def test_binary(shapes, div, dtype):
    a = rand(*shapes[0], dtype=dtype)
    b = rand(*shapes[1], dtype=dtype, positive=True) if div else rand(*shapes[1], dtype=dtype)
    for k, (has_ta, has_tb) in [(1, (True, True)), (3, (True, False)), (2, (False, True))]:
        ta = rand(k, *shapes[0], dtype=dtype) if has_ta else None
        tb = rand(k, *shapes[1], dtype=dtype) if has_tb else None
        y, ty = elementwise.binary_jvp(a, b, ta, tb, div)
        ry, rty = elementwise.binary_reference(d(a), d(b), d(ta), d(tb), div)
        close(y, ry, dtype, scale=4)
        close(ty, rty.expand(ty.shape), dtype, scale=8)


# ---- row-wise ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax(log, dtype):
    for dim, k in [(0, 1), (1, 3), (2, 2)]:
        x = rand(6, 5, 11, dtype=dtype).transpose(0, 2)  # (11, 5, 6), non-contiguous
        t = rand(k, 11, 5, 6, dtype=dtype)
        y, ty = rowwise.softmax_jvp(x, t, dim, log)
        ry, rty = rowwise.softmax_reference(d(x), d(t), dim, log)
        close(y, ry, dtype, scale=2)
        close(ty, rty, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm(dtype):
    x = rand(3, 4, 7, 5, dtype=dtype).transpose(0, 1)
    shape = [7, 5]
    w, b = rand(7, 5, dtype=dtype), rand(7, 5, dtype=dtype)
    for k, args in [(3, (w, b, True, True, True)), (1, (None, None, True, False, False)),
                    (2, (w, None, False, True, False)), (2, (w, b, False, False, True))]:
        ww, bb, has_tx, has_tw, has_tb = args
        tx = rand(k, *x.shape, dtype=dtype) if has_tx else None
        tw = rand(k, 7, 5, dtype=dtype) if has_tw else None
        tb = rand(k, 7, 5, dtype=dtype) if has_tb else None
        out = rowwise.layer_norm_jvp(x, shape, ww, bb, tx, tw, tb, 1e-5)
        ref = rowwise.layer_norm_reference(d(x), shape, d(ww), d(bb), d(tx), d(tw), d(tb), 1e-5)
        for a, r in zip(out, ref):
            close(a, r, dtype, scale=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(dtype):
    x = rand(5, 3, 9, dtype=dtype).transpose(0, 1)
    w = rand(9, dtype=dtype)
    for k, (ww, has_tx, has_tw) in [(3, (w, True, True)), (1, (None, True, False)), (2, (w, False, True))]:
        tx = rand(k, *x.shape, dtype=dtype) if has_tx else None
        tw = rand(k, 9, dtype=dtype) if has_tw else None
        out = rowwise.rms_norm_jvp(x, [9], ww, tx, tw, 1e-6)
        ref = rowwise.rms_norm_reference(d(x), [9], d(ww), d(tx), d(tw), 1e-6)
        for a, r in zip(out, ref):
            close(a, r, dtype, scale=8)


# ---- flash attention -----------------------------------------------------------------------

ATTENTION_CASES = [
    # B, H, Hkv, L, S, head dim, causal, mask
    (1, 2, 2, 5, 7, 32, False, None),
    (2, 4, 2, 9, 9, 64, True, None),           # grouped-query, causal
    (1, 2, 1, 6, 70, 40, False, "bool"),       # several key blocks, odd head dim
    (1, 1, 1, 33, 20, 128, False, "additive"),
    (1, 2, 2, 17, 17, 96, True, "bool"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attention_jvp(case, dtype):
    B, H, Hkv, L, S, D, causal, mask_kind = case
    q, k, v = rand(B, H, L, D, dtype=dtype), rand(B, Hkv, S, D, dtype=dtype), rand(B, Hkv, S, D, dtype=dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(L, S, device=DEVICE) > 0.3
        mask[:, 0] = True
    elif mask_kind == "additive":
        mask = rand(1, 1, L, S, dtype=dtype)
    scale = 0.7 / D ** 0.5
    for kdirs, present in [(3, (True, True, True)), (1, (False, True, False)), (2, (True, False, True))]:
        tq, tk, tv = (rand(kdirs, *x.shape, dtype=dtype) if p else None for x, p in zip((q, k, v), present))
        o, to = attention.flash_attention_jvp(q, k, v, tq, tk, tv, mask, scale, causal)
        ref_mask = mask if mask is None or mask.dtype == torch.bool else d(mask)
        ro, rto = attention.reference(d(q), d(k), d(v), d(tq), d(tk), d(tv), ref_mask, scale, causal)
        close(o, ro, dtype, scale=4)
        close(to, rto, dtype, scale=16)


def test_flash_attention_memory_is_linear_in_sequence_length():
    """No L x S buffer: the fake implementation (what a graph sees) and the kernel's
    outputs are (B, H, L, D)-sized, whatever S is."""
    q, k, v = rand(1, 1, 40, 32), rand(1, 1, 300, 32), rand(1, 1, 300, 32)
    o, to = attention.flash_attention_jvp(q, k, v, rand(2, 1, 1, 40, 32), None, None, None, 0.2, False)
    assert o.shape == q.shape and to.shape == (2,) + tuple(q.shape)


# ---- the whole path: jvp -> rules -> kernels ----------------------------------------------

def _block(x, w, b, wq):
    h = F.layer_norm(x, (x.shape[-1],), w, b)
    q = (h @ wq).reshape(1, x.shape[0], 2, 16).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, q * 0.5, q.sin(), is_causal=True)
    a = a.transpose(1, 2).reshape(x.shape)
    return torch.softmax(F.gelu(a) * torch.sigmoid(x) / (1 + x.exp()), dim=-1)


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_jvp_through_kernels_matches_the_rules_math(path):
    torch.manual_seed(0)
    x, w, b, wq = rand(6, 32), rand(32), rand(32), rand(32, 32) / 6
    tangents = tuple(rand(3, *p.shape) for p in (x, w, b, wq))
    with triton_kernels.at_any_size():
        out, t = torch_fwd.jvp(_block, (x, w, b, wq), tangents, chunked=True, path=path)
    with triton_kernels.disabled():
        ref_out, ref_t = torch_fwd.jvp(_block, (x, w, b, wq), tangents, chunked=True, path="eager")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, ref_t, atol=2e-5, rtol=2e-5)


def test_the_jvp_graph_calls_the_kernels():
    x, w, b, wq = rand(6, 32), rand(32), rand(32), rand(32, 32) / 6
    with triton_kernels.at_any_size():
        code = torch_fwd.make_jvp_graph(_block, x, w, b, wq, chunk=2, for_autograd=False).code
    for op in ("layer_norm_jvp", "flash_attention_jvp", "unary_jvp", "binary_jvp", "softmax_jvp"):
        assert f"torch_fwd.{op}" in code, op


def test_elementwise_and_softmax_kernels_are_launched_from_their_size_threshold(monkeypatch):
    # (below it, a kernel's launch from Python costs more than the passes it saves)
    def f(x, y):
        return torch.softmax(x.sin() * y, -1)
    x, y = rand(4, 8), rand(4, 8)
    tangent_bytes = x.numel() * 2 * x.element_size()  # K = 2
    for family in ("elementwise", "softmax"):
        monkeypatch.setitem(triton_kernels.MIN_TANGENT_BYTES, family, tangent_bytes + 1)
    code = torch_fwd.make_jvp_graph(f, x, y, chunk=2, for_autograd=False).code
    assert "torch_fwd." not in code
    for family in ("elementwise", "softmax"):
        monkeypatch.setitem(triton_kernels.MIN_TANGENT_BYTES, family, tangent_bytes)
    code = torch_fwd.make_jvp_graph(f, x, y, chunk=2, for_autograd=False).code
    for op in ("unary_jvp", "binary_jvp", "softmax_jvp"):
        assert f"torch_fwd.{op}" in code, op


def test_a_graph_traced_for_inductor_keeps_only_the_kernel_inductor_cannot_write():
    # (Inductor fuses the rules' elementwise and row-wise math with their neighbours; it
    # has no flash-attention JVP of its own)
    x, w, b, wq = rand(6, 32), rand(32), rand(32), rand(32, 32) / 6
    with triton_kernels.at_any_size(), triton_kernels.for_inductor():
        code = torch_fwd.make_jvp_graph(_block, x, w, b, wq, chunk=2, for_autograd=False).code
    assert "torch_fwd.flash_attention_jvp" in code
    for op in ("layer_norm_jvp", "unary_jvp", "binary_jvp", "softmax_jvp"):
        assert f"torch_fwd.{op}" not in code, op


def test_without_the_switch_cpu_tensors_use_the_rules_math(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors always use the kernels")
    monkeypatch.delenv("TORCH_FWD_TRITON_ON_CPU")
    triton_kernels.reread_environment()
    x, w, b, wq = rand(6, 32), rand(32), rand(32), rand(32, 32) / 6
    code = torch_fwd.make_jvp_graph(_block, x, w, b, wq, chunk=2, for_autograd=False).code
    assert "torch_fwd." not in code
