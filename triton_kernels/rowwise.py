"""Row-wise JVP kernels: softmax / log_softmax, layer_norm and rms_norm with affine weight
(and bias), tangents on input, weight and bias. One program per row reads the row once and
writes the primal and all K tangent rows; rows up to MAX_ROW elements (one block).
Float32 compute, fp32/fp16/bf16 storage.
"""
from __future__ import annotations

import torch

from . import available, define, reference, worth_launching
from .elementwise import DTYPES

MAX_ROW = 1 << 14

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_jvp_kernel(x_ptr, t_ptr, y_ptr, ty_ptr, C, R, K, LOG: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(x_ptr + row * C + cols, mask=m, other=-float("inf")).to(tl.float32)
        z = x - tl.max(x, axis=0)
        e = tl.where(m, tl.exp(z), 0.0)
        s = tl.sum(e, axis=0)
        p = e / s
        if LOG:
            y = z - tl.log(s)
        else:
            y = p
        tl.store(y_ptr + row * C + cols, y.to(y_ptr.dtype.element_ty), mask=m)
        for k in range(K):
            off = (k * R + row) * C + cols
            t = tl.load(t_ptr + off, mask=m, other=0.0).to(tl.float32)
            dot = tl.sum(p * t, axis=0)
            if LOG:
                ty = t - dot
            else:
                ty = p * (t - dot)
            tl.store(ty_ptr + off, ty.to(ty_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _norm_jvp_kernel(x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, y_ptr, ty_ptr, stat1_ptr, stat2_ptr,
                         C, R, K, eps, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_TX: tl.constexpr, HAS_TW: tl.constexpr, HAS_TB: tl.constexpr, BLOCK: tl.constexpr):
        """layer_norm: y = (x - mean) * rstd * w + b, stats (mean, rstd);
        rms_norm: y = x * rstd * w, stat rstd."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(x_ptr + row * C + cols, mask=m, other=0.0).to(tl.float32)
        if RMS:
            mean = 0.0
            xc = x
        else:
            mean = tl.sum(x, axis=0) / C
            xc = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
        xhat = xc * rstd
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32) if HAS_W else 1.0
        y = xhat * w
        if HAS_B:
            y += tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * C + cols, y.to(y_ptr.dtype.element_ty), mask=m)
        if RMS:
            tl.store(stat1_ptr + row, rstd)
        else:
            tl.store(stat1_ptr + row, mean)
            tl.store(stat2_ptr + row, rstd)
        for k in range(K):
            off = (k * R + row) * C + cols
            ty = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_TX:
                tx = tl.load(tx_ptr + off, mask=m, other=0.0).to(tl.float32)
                proj = tl.sum(tx * xhat, axis=0) / C
                if RMS:
                    txhat = rstd * (tx - xhat * proj)
                else:
                    txhat = rstd * (tx - tl.sum(tx, axis=0) / C - xhat * proj)
                ty += tl.where(m, txhat, 0.0) * w
            if HAS_TW:
                ty += tl.load(tw_ptr + k * C + cols, mask=m, other=0.0).to(tl.float32) * xhat
            if HAS_TB:
                ty += tl.load(tb_ptr + k * C + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(ty_ptr + off, ty.to(ty_ptr.dtype.element_ty), mask=m)


def _rows(x, dim):
    """x with ``dim`` last, contiguous, as (rows, C)."""
    xm = x.movedim(dim, -1).contiguous()
    return xm, xm.reshape(-1, xm.shape[-1]) if xm.dim() else xm.reshape(1, 1)


def softmax_applies(x, t, dim) -> bool:
    if not x.dim():
        return False
    return (x.dtype in DTYPES and t.dtype == x.dtype and x.numel() > 0 and x.shape[dim] <= MAX_ROW
            and worth_launching("softmax", x.numel(), t.shape[0], x.element_size()))


def _softmax_launch(x, t, dim, log):
    xm, x2 = _rows(x, dim)
    tm = t.movedim(dim % x.dim() + 1, -1).contiguous()
    y2, ty = torch.empty_like(x2), torch.empty_like(tm)
    r, c = x2.shape
    _softmax_jvp_kernel[(r,)](x2, tm, y2, ty, c, r, t.shape[0], LOG=log,
                                                          BLOCK=triton.next_power_of_2(c))
    return y2.reshape(xm.shape).movedim(-1, dim).contiguous(), ty.movedim(-1, dim % x.dim() + 1).contiguous()


def _softmax_fake(x, t, dim, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(t, memory_format=torch.contiguous_format)


def softmax_reference(x, t, dim, log):
    op = torch.ops.aten._log_softmax.default if log else torch.ops.aten._softmax.default
    return reference(op, (x, dim, False), (t, None, None))


#: (softmax(x, dim), its tangents) or the same for log_softmax, t of shape (K, *x.shape)
softmax_jvp = define("softmax_jvp", "(Tensor x, Tensor t, int dim, bool log) -> (Tensor, Tensor)",
                     _softmax_launch, softmax_reference, _softmax_fake)


def norm_applies(x, normalized_shape, *tensors) -> bool:
    c = 1
    for s in normalized_shape:
        c *= s
    return (x.dtype in DTYPES and all(t is None or t.dtype == x.dtype for t in tensors) and x.numel() > 0
            and 0 < c <= MAX_ROW)


def _norm_launch(x, normalized_shape, w, b, tx, tw, tb, eps, rms):
    n_norm = len(normalized_shape)
    c = 1
    for s in normalized_shape:
        c *= s
    x2 = x.contiguous().reshape(-1, c)
    r = x2.shape[0]
    k = next(t for t in (tx, tw, tb) if t is not None).shape[0]
    y = torch.empty_like(x2)
    ty = torch.empty((k, r, c), dtype=x.dtype, device=x.device)
    stat_shape = tuple(x.shape[:x.dim() - n_norm]) + (1,) * n_norm
    stat1 = torch.empty(r, dtype=torch.float32, device=x.device)
    stat2 = torch.empty(r, dtype=torch.float32, device=x.device)

    def flat(t, per):
        return t.contiguous().reshape(per) if t is not None else x2
    _norm_jvp_kernel[(r,)](
        x2, flat(w, (c,)), flat(b, (c,)), flat(tx, (k, r, c)), flat(tw, (k, c)), flat(tb, (k, c)), y, ty, stat1, stat2,
        c, r, k, eps, RMS=rms, HAS_W=w is not None, HAS_B=b is not None, HAS_TX=tx is not None,
        HAS_TW=tw is not None, HAS_TB=tb is not None, BLOCK=triton.next_power_of_2(c))
    stats = (stat1.reshape(stat_shape).to(x.dtype),) if rms else (stat1.reshape(stat_shape).to(x.dtype),
                                                                  stat2.reshape(stat_shape).to(x.dtype))
    return (y.reshape(x.shape), ty.reshape((k,) + tuple(x.shape))) + stats


def _layer_norm_fake(x, normalized_shape, w, b, tx, tw, tb, eps):
    k = next(t for t in (tx, tw, tb) if t is not None).shape[0]
    stat = tuple(x.shape[:x.dim() - len(normalized_shape)]) + (1,) * len(normalized_shape)
    return x.new_empty(x.shape), x.new_empty((k,) + tuple(x.shape)), x.new_empty(stat), x.new_empty(stat)


def _rms_norm_fake(x, normalized_shape, w, tx, tw, eps):
    k = next(t for t in (tx, tw) if t is not None).shape[0]
    stat = tuple(x.shape[:x.dim() - len(normalized_shape)]) + (1,) * len(normalized_shape)
    return x.new_empty(x.shape), x.new_empty((k,) + tuple(x.shape)), x.new_empty(stat)


def layer_norm_reference(x, normalized_shape, w, b, tx, tw, tb, eps):
    (y, mean, rstd), (ty, _, _) = reference(torch.ops.aten.native_layer_norm.default,
                                             (x, normalized_shape, w, b, eps), (tx, None, tw, tb, None))
    return y, ty, mean, rstd


def rms_norm_reference(x, normalized_shape, w, tx, tw, eps):
    (y, rstd), (ty, _) = reference(torch.ops.aten._fused_rms_norm.default, (x, normalized_shape, w, eps),
                                    (tx, None, tw, None))
    return y, ty, rstd


#: (out, tangent of out, mean, rstd) of native_layer_norm; tangents (K, ...)
layer_norm_jvp = define(
    "layer_norm_jvp",
    "(Tensor x, int[] normalized_shape, Tensor? w, Tensor? b, Tensor? tx, Tensor? tw, Tensor? tb, float eps)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    lambda x, ns, w, b, tx, tw, tb, eps: _norm_launch(x, ns, w, b, tx, tw, tb, eps, False),
    layer_norm_reference, _layer_norm_fake)
#: (out, tangent of out, rstd) of _fused_rms_norm; tangents (K, ...)
rms_norm_jvp = define(
    "rms_norm_jvp",
    "(Tensor x, int[] normalized_shape, Tensor? w, Tensor? tx, Tensor? tw, float eps) -> (Tensor, Tensor, Tensor)",
    lambda x, ns, w, tx, tw, eps: _norm_launch(x, ns, w, None, tx, tw, None, eps, True),
    rms_norm_reference, _rms_norm_fake)
