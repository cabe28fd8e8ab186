"""Flash-attention JVP: the output of scaled_dot_product_attention and its tangents in one
pass over the keys, FlashAttention-2 style, memory linear in the sequence length (the
L x S scores are never stored).

With S = scale Q K^T (+ mask), P = softmax(S), O = P V, the tangent is
    dO = sum_j P_j (dS_j - sum_i P_i dS_i) V_j + P dV,   dS = scale (dQ K^T + Q dK^T),
so next to the usual online-softmax state (row max m, row sum l, acc = sum e^(S-m) V) a
program keeps mu = sum e^(S-m) dS and acc_t = sum e^(S-m) (dS V + dV), and ends with
    O = acc / l,   dO = acc_t / l - (mu / l) O.
One program per (query block, batch x head, direction): each direction recomputes the
scores, which keeps the state in registers for any K. Causal masking (top-left aligned,
as PyTorch's is_causal), boolean and additive masks broadcast to (B, H, L, S), grouped-
query attention (H a multiple of the key/value heads), head dims up to 256, fp32/fp16/
bf16 (dots accumulate in fp32; fp16 dots take fp16 operands, bf16 ones are done in fp32
with TF32, fp32 ones in exact IEEE).
"""
from __future__ import annotations

import math

import torch

from . import available, define
from .elementwise import DTYPES

MAX_HEAD_DIM = 256

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _flash_jvp_kernel(q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, mask_ptr, o_ptr, to_ptr,
                          H, HKV, L, S, D, scale, nq, nk,
                          msb, msh, msl, mss,
                          HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, MASK: tl.constexpr,
                          CAUSAL: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        kd = tl.program_id(2).to(tl.int64)
        b = bh // H
        h = bh % H
        hk = h // (H // HKV)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        q_base = (b * H + h).to(tl.int64) * L * D
        kv_base = (b * HKV + hk).to(tl.int64) * S * D
        q_off = q_base + offs_m[:, None] * D + offs_d[None, :]
        q_in = (offs_m < L)[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_ptr + q_off, mask=q_in, other=0.0).to(DOT)
        if HAS_TQ:
            tq = tl.load(tq_ptr + kd * nq + q_off, mask=q_in, other=0.0).to(DOT)
        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        mu = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, S, BLOCK_N):
            offs_n = start_n + offs_n0
            kv_off = kv_base + offs_n[:, None] * D + offs_d[None, :]
            kv_in = (offs_n < S)[:, None] & (offs_d < D)[None, :]
            kk = tl.load(k_ptr + kv_off, mask=kv_in, other=0.0).to(DOT)
            vv = tl.load(v_ptr + kv_off, mask=kv_in, other=0.0).to(DOT)
            s = tl.dot(q, tl.trans(kk), input_precision=PREC) * scale
            valid = (offs_m < L)[:, None] & (offs_n < S)[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            if MASK != 0:
                m_off = b.to(tl.int64) * msb + h * msh + offs_m[:, None] * msl + offs_n[None, :] * mss
                if MASK == 1:
                    keep = tl.load(mask_ptr + m_off, mask=valid, other=0)
                    valid = valid & (keep != 0)
                else:
                    s += tl.load(mask_ptr + m_off, mask=valid, other=0.0).to(tl.float32)
            s = tl.where(valid, s, -float("inf"))
            ts = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_TQ:
                ts += tl.dot(tq, tl.trans(kk), input_precision=PREC)
            if HAS_TK:
                tkk = tl.load(tk_ptr + kd * nk + kv_off, mask=kv_in, other=0.0).to(DOT)
                ts += tl.dot(q, tl.trans(tkk), input_precision=PREC)
            ts = tl.where(valid, ts * scale, 0.0)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with nothing valid yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            pts = p * ts
            l_i = l_i * alpha + tl.sum(p, axis=1)
            mu = mu * alpha + tl.sum(pts, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
            acc_t = acc_t * alpha[:, None] + tl.dot(pts.to(vv.dtype), vv, input_precision=PREC)
            if HAS_TV:
                tvv = tl.load(tv_ptr + kd * nk + kv_off, mask=kv_in, other=0.0).to(DOT)
                acc_t += tl.dot(p.to(tvv.dtype), tvv, input_precision=PREC)
            m_i = m_new
        o = acc / l_i[:, None]
        to = acc_t / l_i[:, None] - (mu / l_i)[:, None] * o
        if kd == 0:
            tl.store(o_ptr + q_off, o.to(o_ptr.dtype.element_ty), mask=q_in)
        tl.store(to_ptr + kd * nq + q_off, to.to(to_ptr.dtype.element_ty), mask=q_in)


def applies(q, k, v, mask, tq, tk, tv, tmask, dropout_p) -> bool:
    """4-D (B, H, L, D) inputs of one floating dtype, value head dim equal to the query's,
    H a multiple of the key/value heads, no dropout, no tangent on the mask."""
    if dropout_p or tmask is not None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if not (q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype):
        return False
    if any(t is not None and t.dtype != q.dtype for t in (tq, tk, tv)) or all(t is None for t in (tq, tk, tv)):
        return False
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d or v.shape[-1] != d or h % k.shape[1]:
        return False
    if mask is not None and (mask.dim() > 4 or not (mask.dtype == torch.bool or mask.dtype == q.dtype)):
        return False
    return 0 < d <= MAX_HEAD_DIM and q.numel() > 0 and k.shape[2] > 0


def _launch(q, k, v, tq, tk, tv, mask, scale, is_causal):
    b, h, L, d = q.shape
    hkv, S = k.shape[1], k.shape[2]
    kdirs = next(t for t in (tq, tk, tv) if t is not None).shape[0]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    to = torch.empty((kdirs,) + tuple(q.shape), dtype=q.dtype, device=q.device)
    kind, m, strides = 0, q, (0, 0, 0, 0)
    if mask is not None:
        m = mask.expand(b, h, L, S)
        kind = 1 if mask.dtype == torch.bool else 2
        if kind == 1:
            m = m.view(torch.uint8)
        strides = m.stride()
    block_d = max(16, triton.next_power_of_2(d))
    block = 64 if block_d <= 64 else 32
    grid = (triton.cdiv(L, block), b * h, kdirs)
    _flash_jvp_kernel[grid](
        q, k, v, tq.contiguous() if tq is not None else q, tk.contiguous() if tk is not None else k,
        tv.contiguous() if tv is not None else v, m, o, to, h, hkv, L, S, d, scale, q.numel(), k.numel(), *strides,
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, MASK=kind, CAUSAL=is_causal,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", DOT=tl.float16 if q.dtype == torch.float16 else tl.float32,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    return o, to


def _fake(q, k, v, tq, tk, tv, mask, scale, is_causal):
    kdirs = next(t for t in (tq, tk, tv) if t is not None).shape[0]
    return q.new_empty(q.shape), q.new_empty((kdirs,) + tuple(q.shape))


def reference(q, k, v, tq, tk, tv, mask, scale, is_causal):
    """The attention rule's own math (rules/nn.py), which materialises the scores."""
    from torch_fwd.rules.nn import attention_jvp
    return attention_jvp(q, k, v, mask, tq, tk, tv, None, scale, is_causal)


#: (attention output, its K tangents) for (B, H, L, D) q and (B, Hkv, S, D) k, v; tangents
#: (K, ...) or None
flash_attention_jvp = define(
    "flash_attention_jvp",
    "(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, Tensor? mask, float scale, bool is_causal)"
    " -> (Tensor, Tensor)", _launch, reference, _fake)


def default_scale(q, scale):
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
