"""Fused elementwise JVPs: one pass reads x once and writes y and all K tangents.

One kernel template for every unary op, driven by the table ``UNARY``: the op id is a
``tl.constexpr``, so each op compiles to its own straight-line kernel. Binary mul and div
broadcast up to 4 dimensions. Everything computes in float32 and stores in the tensors'
dtype (fp32, fp16, bf16).
"""
from __future__ import annotations

import torch

from . import available, define, reference, worth_launching

UNARY = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "sigmoid": 3, "tanh": 4, "softplus": 5, "elu": 6, "exp": 7,
         "log": 8, "sin": 9, "cos": 10}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024
MAX_DIMS = 4

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _primal_and_derivative(x, p0, p1, OP: tl.constexpr):
        if OP == 0:  # gelu (erf)
            cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
            y = x * cdf
            d = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        elif OP == 1:  # gelu (tanh approximation)
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            th = _tanh(inner)
            y = 0.5 * x * (1.0 + th)
            d = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        elif OP == 2:  # silu
            s = tl.sigmoid(x)
            y = x * s
            d = s * (1.0 + x * (1.0 - s))
        elif OP == 3:  # sigmoid
            y = tl.sigmoid(x)
            d = y * (1.0 - y)
        elif OP == 4:  # tanh
            y = _tanh(x)
            d = 1.0 - y * y
        elif OP == 5:  # softplus(beta=p0, threshold=p1)
            z = x * p0
            soft = (tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))) / p0
            y = tl.where(z > p1, x, soft)
            d = tl.where(z > p1, 1.0, tl.sigmoid(z))
        elif OP == 6:  # elu(alpha=p0)
            e = tl.exp(tl.minimum(x, 0.0))
            y = tl.where(x > 0.0, x, p0 * (e - 1.0))
            d = tl.where(x > 0.0, 1.0, p0 * e)
        elif OP == 7:  # exp
            y = tl.exp(x)
            d = y
        elif OP == 8:  # log
            y = tl.log(x)
            d = 1.0 / x
        elif OP == 9:  # sin
            y = tl.sin(x)
            d = tl.cos(x)
        else:  # cos
            y = tl.cos(x)
            d = -tl.sin(x)
        return y, d

    @triton.jit
    def _unary_jvp_kernel(x_ptr, t_ptr, y_ptr, ty_ptr, n, K, p0, p1, OP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=1.0).to(tl.float32)
        y, d = _primal_and_derivative(x, p0, p1, OP)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
        for k in range(K):
            t = tl.load(t_ptr + k * n + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(ty_ptr + k * n + offs, (d * t).to(ty_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _binary_jvp_kernel(a_ptr, b_ptr, ta_ptr, tb_ptr, y_ptr, ty_ptr, n, K, na, nb, S1, S2, S3,
                           as0, as1, as2, as3, bs0, bs1, bs2, bs3,
                           DIV: tl.constexpr, HAS_TA: tl.constexpr, HAS_TB: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        i3 = offs % S3
        r = offs // S3
        i2 = r % S2
        r = r // S2
        i1 = r % S1
        i0 = r // S1
        ao = i0 * as0 + i1 * as1 + i2 * as2 + i3 * as3
        bo = i0 * bs0 + i1 * bs1 + i2 * bs2 + i3 * bs3
        a = tl.load(a_ptr + ao, mask=m, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + bo, mask=m, other=1.0).to(tl.float32)
        if DIV:
            y = a / b
        else:
            y = a * b
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
        for k in range(K):
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_TA:
                ta = tl.load(ta_ptr + k * na + ao, mask=m, other=0.0).to(tl.float32)
                if DIV:
                    acc += ta / b
                else:
                    acc += ta * b
            if HAS_TB:
                tb = tl.load(tb_ptr + k * nb + bo, mask=m, other=0.0).to(tl.float32)
                if DIV:
                    acc -= y * tb / b
                else:
                    acc += a * tb
            tl.store(ty_ptr + k * n + offs, acc.to(ty_ptr.dtype.element_ty), mask=m)


def unary_applies(x, t) -> bool:
    return (x.dtype in DTYPES and t.dtype == x.dtype and x.numel() > 0
            and worth_launching("elementwise", x.numel(), t.shape[0], x.element_size()))


def _unary_launch(x, t, op, p0, p1):
    xc, tc = x.contiguous(), t.contiguous()
    y, ty = torch.empty_like(xc), torch.empty_like(tc)
    n = xc.numel()
    grid = (triton.cdiv(n, BLOCK),)
    _unary_jvp_kernel[grid](xc, tc, y, ty, n, tc.shape[0], p0, p1,
                                                        OP=UNARY[op], BLOCK=BLOCK)
    return y, ty


def _broadcast_strides(x, shape):
    """Element strides of contiguous x broadcast to ``shape`` (padded to MAX_DIMS): 0 on
    broadcast dimensions."""
    xs = [1] * (len(shape) - x.dim()) + list(x.shape)
    strides, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = 0 if xs[d] == 1 and shape[d] != 1 else acc
        acc *= xs[d]
    return [0] * (MAX_DIMS - len(shape)) + strides


def binary_applies(a, b, ta, tb) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    shape = torch.broadcast_shapes(a.shape, b.shape)
    if not (a.dtype == b.dtype and a.dtype in DTYPES and len(shape) <= MAX_DIMS and all(s > 0 for s in shape)
            and all(t is None or t.dtype == a.dtype for t in (ta, tb)) and (ta is not None or tb is not None)):
        return False
    return worth_launching("elementwise", shape.numel(), (ta if ta is not None else tb).shape[0], a.element_size())


def _binary_launch(a, b, ta, tb, div):
    shape = tuple(torch.broadcast_shapes(a.shape, b.shape))
    a, b = a.contiguous(), b.contiguous()
    k = (ta if ta is not None else tb).shape[0]
    y = torch.empty(shape, dtype=a.dtype, device=a.device)
    ty = torch.empty((k,) + shape, dtype=a.dtype, device=a.device)
    full = [1] * (MAX_DIMS - len(shape)) + list(shape)
    n = y.numel()
    grid = (triton.cdiv(n, BLOCK),)
    _binary_jvp_kernel[grid](
        a, b, ta.contiguous() if ta is not None else a, tb.contiguous() if tb is not None else b, y, ty, n, k,
        a.numel(), b.numel(), full[1], full[2], full[3], *_broadcast_strides(a, shape), *_broadcast_strides(b, shape),
        DIV=div, HAS_TA=ta is not None, HAS_TB=tb is not None, BLOCK=BLOCK)
    return y, ty


def _unary_fake(x, t, op, p0, p1):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(t, memory_format=torch.contiguous_format)


def _binary_fake(a, b, ta, tb, div):
    shape = tuple(torch.broadcast_shapes(a.shape, b.shape))
    k = (ta if ta is not None else tb).shape[0]
    return a.new_empty(shape), a.new_empty((k,) + shape)


# ---- CPU: the reference (the rule table's PyTorch math), or the kernel under the interpreter switch

_aten = torch.ops.aten
_REFERENCE_CALLS = {
    "gelu": lambda x, p0, p1: (_aten.gelu.default, (x, "none")),
    "gelu_tanh": lambda x, p0, p1: (_aten.gelu.default, (x, "tanh")),
    "silu": lambda x, p0, p1: (_aten.silu.default, (x,)),
    "sigmoid": lambda x, p0, p1: (_aten.sigmoid.default, (x,)),
    "tanh": lambda x, p0, p1: (_aten.tanh.default, (x,)),
    "softplus": lambda x, p0, p1: (_aten.softplus.default, (x, p0, p1)),
    "elu": lambda x, p0, p1: (_aten.elu.default, (x, p0, 1, 1)),
    "exp": lambda x, p0, p1: (_aten.exp.default, (x,)),
    "log": lambda x, p0, p1: (_aten.log.default, (x,)),
    "sin": lambda x, p0, p1: (_aten.sin.default, (x,)),
    "cos": lambda x, p0, p1: (_aten.cos.default, (x,)),
}


def unary_reference(x, t, op, p0, p1):
    aten_op, args = _REFERENCE_CALLS[op](x, p0, p1)
    return reference(aten_op, args, (t,) + (None,) * (len(args) - 1))


def binary_reference(a, b, ta, tb, div):
    y, ty = reference(_aten.div.Tensor if div else _aten.mul.Tensor, (a, b), (ta, tb))
    return y, ty.expand((ty.shape[0],) + tuple(y.shape))


#: (op(x), op'(x) * t) for t of shape (K, *x.shape), in one pass
unary_jvp = define("unary_jvp", "(Tensor x, Tensor t, str op, float p0, float p1) -> (Tensor, Tensor)",
                   _unary_launch, unary_reference, _unary_fake)
#: (a * b, ta * b + a * tb) or (a / b, (ta - y tb) / b), broadcasting, in one pass
binary_jvp = define("binary_jvp", "(Tensor a, Tensor b, Tensor? ta, Tensor? tb, bool div) -> (Tensor, Tensor)",
                    _binary_launch, binary_reference, _binary_fake)
