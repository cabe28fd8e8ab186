"""Neural-network ops: softmax, norms, convolution, attention, dropout.

Fused rules share work between primal and tangent: the primal comes from the op itself
(so running statistics, RNG state and numerics are exactly the primal's), the tangent
reuses its saved statistics.
"""
import math

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false

from torch_fwd import triton_kernels
from torch_fwd.combinators import decompose_with, linear, shift_dim, with_kernel
from torch_fwd.engine import above_dispatch, for_autograd
from torch_fwd.registry import call_op, library_rule as reg
from torch_fwd.tangent import align, tadd

from ._cases import case, randn
from .linalg import product_tangent

aten = torch.ops.aten


# ---- softmax ------------------------------------------------------------------------------
def softmax_tangent(y, ty, dim):
    """y (ty - sum(y ty)) along ``dim`` of y (ty has a leading K and may broadcast against
    y): the softmax's backward formula, which is its JVP too, so ATen's one fused
    ``_softmax_backward_data`` computes it (four passes over the tangent as separate ops;
    Inductor decomposes it back into the four and fuses them)."""
    shape = torch.broadcast_shapes(ty.shape, (ty.shape[0],) + tuple(y.shape))
    return aten._softmax_backward_data.default(ty.expand(shape), y.expand(shape), shift_dim(dim, y.dim()), y.dtype)


def _softmax(p, t):
    x, dim, half_to_float = p
    y = aten._softmax.default(x, dim, half_to_float)
    if t[0] is None:
        return y, None
    if x.dim() == 0:  # the softmax of a scalar is 1 whatever the scalar
        return y, torch.zeros_like(t[0], dtype=y.dtype)
    return y, softmax_tangent(y, t[0].to(y.dtype), dim)


def _log_softmax(p, t):
    x, dim, half_to_float = p
    y = aten._log_softmax.default(x, dim, half_to_float)
    if t[0] is None:
        return y, None
    if x.dim() == 0:  # 0 whatever the scalar
        return y, torch.zeros_like(t[0], dtype=y.dtype)
    tx = t[0].to(y.dtype)
    return y, tx - (torch.exp(y) * tx).sum(shift_dim(dim, x.dim()), keepdim=True)


def _softmax_kernel(log):
    def try_kernel(p, t):
        x, dim, half_to_float = p
        if t[0] is None or half_to_float:
            return None
        from torch_fwd.triton_kernels import rowwise
        if not rowwise.softmax_applies(x, t[0], dim):
            return None
        return rowwise.softmax_jvp(x, t[0], dim % x.dim(), log)
    return try_kernel


reg(aten._softmax.default, with_kernel(_softmax, _softmax_kernel(False)))
reg(aten._log_softmax.default, with_kernel(_log_softmax, _softmax_kernel(True)))


# ---- average pooling: linear in the input (the divisor depends on shapes only) ---------------
def _batched_pool(op, spatial):
    """op applied to each of K tangents, the chunk folded into the batch dimension."""
    def tangent(tx, x, *args):
        k = tx.shape[0]
        if x.dim() == spatial + 1:  # unbatched input: the chunk is the batch
            return call_op(op, (tx,) + args)
        y = call_op(op, (tx.reshape((k * x.shape[0],) + tuple(x.shape[1:])),) + args)
        return y.reshape((k, x.shape[0]) + tuple(y.shape[1:]))
    return tangent


for _op, _spatial in [(aten.avg_pool2d.default, 2), (aten.avg_pool3d.default, 3)]:
    reg(_op, linear(_op, _batched_pool(_op, _spatial)))


# ---- max pooling: the input's tangent at the chosen positions ------------------------------
def _max_pool_with_indices(op, spatial):
    """The op returns the flat position (within each channel's spatial dims) of every
    maximum: the tangent gathers the input tangent there. (Torch 2.12 has no forward-AD
    formula that autograd can differentiate again, so nested JVPs need this rule.)"""
    def rule(p, t):
        out, idx = call_op(op, p)
        if t[0] is None:
            return (out, idx), None
        tx = t[0]
        flat = tx.flatten(-spatial)
        where = idx.flatten(-spatial).unsqueeze(0).expand(flat.shape[:-1] + (idx.flatten(-spatial).shape[-1],))
        return (out, idx), (flat.gather(-1, where).reshape((tx.shape[0],) + tuple(out.shape)), None)
    return rule


for _op, _spatial in [(aten.max_pool2d_with_indices.default, 2), (aten.max_pool3d_with_indices.default, 3)]:
    reg(_op, _max_pool_with_indices(_op, _spatial))


# ---- normalisation ------------------------------------------------------------------------
def _normalized_tangent(x, tx, mean, rstd, dims):
    """For xhat = (x - mean) * rstd with mean/var over ``dims`` (biased): the tangents of
    xhat, mean and rstd. ``mean``/``rstd`` broadcast against x."""
    xhat = (x - mean) * rstd
    tdims = [d + 1 for d in dims]
    tmean = tx.mean(dim=tdims, keepdim=True)
    txhat_mean = (tx * xhat).mean(dim=tdims, keepdim=True)
    txhat = rstd * (tx - tmean - xhat * txhat_mean)
    trstd = -rstd * rstd * txhat_mean
    return xhat, txhat, tmean, trstd


def _affine(xhat, txhat, w, b, tw, tb, shape):
    """y = xhat * w + b with w, b viewed as ``shape``."""
    out = txhat if w is None or txhat is None else txhat * w.reshape(shape)
    if tw is not None:
        out = tadd(out, align(tw.reshape((tw.shape[0],) + tuple(shape)), xhat.dim()) * xhat)
    if tb is not None:
        out = tadd(out, align(tb.reshape((tb.shape[0],) + tuple(shape)), xhat.dim()))
    return out


def _differentiable_stats(x, dims, eps, mean, rstd):
    """The op's saved mean and rstd, or, when the tangents will be back-propagated
    through, the same statistics recomputed by ops autograd differentiates (it treats the
    saved ones as constants)."""
    if not for_autograd():
        return mean, rstd
    var, m = torch.var_mean(x, dims, correction=0, keepdim=True)
    return m.reshape(mean.shape), torch.rsqrt(var + eps).reshape(rstd.shape)


def _layer_norm(p, t):
    x, normalized_shape, w, b, eps = p
    out, mean, rstd = aten.native_layer_norm.default(x, normalized_shape, w, b, eps)
    tx, tw, tb = t[0], t[2], t[3]
    axis = x.dim() - len(normalized_shape)
    dims = list(range(axis, x.dim()))
    m, r = _differentiable_stats(x, dims, eps, mean, rstd)
    if tx is not None:
        xhat, txhat, tmean, trstd = _normalized_tangent(x, tx, m, r, dims)
    else:
        xhat, txhat, tmean, trstd = (x - m) * r, None, None, None
    return (out, mean, rstd), (_affine(xhat, txhat, w, b, tw, tb, tuple(normalized_shape)), tmean, trstd)


def _stats_like(op, p, stats):
    """The kernels keep statistics in float32: give them the dtype the op's own would have."""
    meta = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in p])
    return tuple(s.to(m.dtype) for s, m in zip(stats, meta[1:]))


def _layer_norm_kernel(p, t):
    x, normalized_shape, w, b, eps = p
    tx, tw, tb = t[0], t[2], t[3]
    from torch_fwd.triton_kernels import rowwise
    if not rowwise.norm_applies(x, normalized_shape, w, b, tx, tw, tb):
        return None
    out, tout, mean, rstd = rowwise.layer_norm_jvp(x, list(normalized_shape), w, b, tx, tw, tb, eps)
    mean, rstd = _stats_like(aten.native_layer_norm.default, p, (mean, rstd))
    tmean = trstd = None
    if tx is not None:  # the saved statistics' tangents, rarely used (dead code in a graph)
        dims = list(range(x.dim() - len(normalized_shape), x.dim()))
        _, _, tmean, trstd = _normalized_tangent(x, tx, mean, rstd, dims)
    return (out, mean, rstd), (tout, tmean, trstd)


reg(aten.native_layer_norm.default, with_kernel(_layer_norm, _layer_norm_kernel))


def _rms_norm(p, t):
    x, normalized_shape, w, eps = p
    out, rstd = aten._fused_rms_norm.default(x, normalized_shape, w, eps)
    tx, tw = t[0], t[2]
    dims = [d + 1 for d in range(x.dim() - len(normalized_shape), x.dim())]
    xhat = x * rstd
    txhat = None
    trstd = None
    if tx is not None:
        m = (tx * xhat).mean(dim=dims, keepdim=True)
        txhat = rstd * (tx - xhat * m)
        trstd = -rstd * m
    return (out, rstd), (_affine(xhat, txhat, w, None, tw, None, tuple(normalized_shape)), trstd)


def _rms_norm_kernel(p, t):
    x, normalized_shape, w, eps = p
    tx, tw = t[0], t[2]
    if eps is None:
        return None
    from torch_fwd.triton_kernels import rowwise
    if not rowwise.norm_applies(x, normalized_shape, w, tx, tw):
        return None
    out, tout, rstd = rowwise.rms_norm_jvp(x, list(normalized_shape), w, tx, tw, eps)
    (rstd,) = _stats_like(aten._fused_rms_norm.default, p, (rstd,))
    trstd = None
    if tx is not None:
        dims = [d + 1 for d in range(x.dim() - len(normalized_shape), x.dim())]
        trstd = -rstd * (tx * (x * rstd)).mean(dim=dims, keepdim=True)
    return (out, rstd), (tout, trstd)


reg(aten._fused_rms_norm.default, with_kernel(_rms_norm, _rms_norm_kernel))


def _batch_norm_core(x, w, b, rm, rv, training, eps, save_mean, save_invstd, tx, tw, tb, trm, trv):
    """Tangents of (out, save_mean, save_invstd) and, in training, of the batch mean and
    biased variance (for the running statistics a functional variant returns)."""
    c_shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    tvar = None
    if training or rm is None:
        save_mean, save_invstd = _differentiable_stats(x, dims, eps, save_mean, save_invstd)
        mean = save_mean.reshape(c_shape)
        rstd = save_invstd.reshape(c_shape)
        if tx is not None:
            xhat, txhat, tmean, trstd = _normalized_tangent(x, tx, mean, rstd, dims)
            tmean, trstd = tmean.reshape(tmean.shape[0], -1), trstd.reshape(trstd.shape[0], -1)
            tvar = -2 * trstd / save_invstd ** 3  # var = rstd^-2 - eps
        else:
            xhat, txhat, tmean, trstd = (x - mean) * rstd, None, None, None
    else:
        # eval: the output reads the running statistics, so their tangents flow into it
        rstd = torch.rsqrt(rv.reshape(c_shape) + eps)
        xhat = (x - rm.reshape(c_shape)) * rstd
        txhat = None if tx is None else tx * rstd
        if trm is not None:
            txhat = tadd(txhat, -align(trm.reshape((trm.shape[0],) + c_shape[1:]), x.dim()) * rstd)
        if trv is not None:
            txhat = tadd(txhat, align(trv.reshape((trv.shape[0],) + c_shape[1:]), x.dim()) * (-0.5 * xhat * rstd * rstd))
        tmean = trstd = None
    return _affine(xhat, txhat, w, b, tw, tb, c_shape[1:]), tmean, trstd, tvar


def _batch_norm_rule(op, training=None):
    """Every ATen batch norm: (input, weight, bias[, running_mean, running_var][, training],
    momentum, eps) -> (out, save_mean, save_invstd, *extras). The op itself computes the
    primal and updates the running statistics in place. A functional variant returns the
    new statistics, (1 - momentum) * running + momentum * batch statistic (variance
    unbiased), and they get that tangent; other extras (reserve) have none.
    ``training``: fixed by the op when it has no such argument (None: train exactly when
    there are no running statistics)."""
    names = [a.name for a in op._schema.arguments]
    returns_stats = op._schema.name.endswith("_functional")

    def rule(p, t):
        a, ta = dict(zip(names, p)), dict(zip(names, t))
        outs = call_op(op, p)
        rm, rv = a.get("running_mean"), a.get("running_var")
        trm, trv = ta.get("running_mean"), ta.get("running_var")
        train = a.get("training", rm is None if training is None else training)
        to, tm, ti, tvar = _batch_norm_core(a["input"], a["weight"], a["bias"], rm, rv, train, a["eps"],
                                            outs[1], outs[2], ta["input"], ta["weight"], ta["bias"], trm, trv)
        extras = [None] * (len(outs) - 3)
        if returns_stats and rm is not None:
            m = a["momentum"]
            n = a["input"].numel() // a["input"].shape[1]
            for i, (tr, tb) in enumerate(((trm, tm), (trv, None if tvar is None else tvar * (n / max(n - 1, 1))))):
                if train:
                    extras[i] = tadd(None if tr is None else (1 - m) * tr, None if tb is None else m * tb)
                else:
                    extras[i] = tr
        return outs, (to, tm, ti) + tuple(extras)
    return rule


for _op, _training in [(aten.native_batch_norm.default, None), (aten._native_batch_norm_legit.default, None),
                       (aten._native_batch_norm_legit.no_stats, None),
                       (aten._native_batch_norm_legit_no_training.default, False),
                       (aten._native_batch_norm_legit_functional.default, None),
                       (aten._batch_norm_with_update.default, True),
                       (aten._batch_norm_with_update_functional.default, True),
                       (aten._batch_norm_no_update.default, None)]:
    reg(_op, _batch_norm_rule(_op, _training))


def _rrelu_slopes(op):
    """rrelu: y = x * s with s drawn per element (training) or fixed; the op writes s into
    ``noise``, so the tangent is dx * s with the primal's own draw."""
    def rule(p, t):
        x, noise, lower, upper, training = p[:5]
        res = call_op(op, p)
        y = res[0] if isinstance(res, tuple) else res
        if training:
            slopes = (res[1] if isinstance(res, tuple) else noise)
        else:
            slopes = torch.where(x >= 0, torch.ones_like(x), torch.full_like(x, (lower + upper) / 2))
        ty = None if t[0] is None else t[0] * slopes
        return res, ((ty, None) if isinstance(res, tuple) else ty)
    return rule


reg(aten.rrelu_with_noise.default, _rrelu_slopes(aten.rrelu_with_noise.default))
reg(aten.rrelu_with_noise_functional.default, _rrelu_slopes(aten.rrelu_with_noise_functional.default))


def _group_norm(p, t):
    x, w, b, n, c, hxw, group, eps = p
    out, mean, rstd = aten.native_group_norm.default(*p)
    tx, tw, tb = t[0], t[1], t[2]
    xg = x.reshape(n, group, -1)
    m, r = mean.reshape(n, group, 1), rstd.reshape(n, group, 1)
    c_shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    if tx is not None:
        xhat, txhat, tmean, trstd = _normalized_tangent(xg, tx.reshape(tx.shape[0], n, group, -1), m, r, [2])
        xhat, txhat = xhat.reshape(x.shape), txhat.reshape(tx.shape)
        tmean, trstd = tmean.reshape(tmean.shape[0], n, group), trstd.reshape(trstd.shape[0], n, group)
    else:
        xhat, txhat, tmean, trstd = ((xg - m) * r).reshape(x.shape), None, None, None
    return (out, mean, rstd), (_affine(xhat, txhat, w, b, tw, tb, c_shape), tmean, trstd)


reg(aten.native_group_norm.default, _group_norm)


# ---- convolution (bilinear) -------------------------------------------------------------
def _convolution(p, t):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = p
    tx, tw, tb = t[0], t[1], t[2]
    joined = _joined_convolution(p, t)
    if joined is not None:
        return joined
    y = aten.convolution.default(*p)
    out = None
    if tx is not None:
        k = tx.shape[0]
        folded = tx.reshape((k * x.shape[0],) + tuple(x.shape[1:]))
        ty = aten.convolution.default(folded, w, None, stride, padding, dilation, transposed, output_padding, groups)
        out = ty.reshape((k,) + tuple(y.shape))
    if tw is not None:
        with above_dispatch():
            tyw = torch.vmap(lambda wk: aten.convolution.default(
                x, wk, None, stride, padding, dilation, transposed, output_padding, groups))(tw)
        out = tadd(out, tyw)
    if tb is not None:
        out = tadd(out, tb.reshape((tb.shape[0], 1, -1) + (1,) * (y.dim() - 2)))
    return y, out


def _joined_convolution(p, t):
    """Under Inductor, without bias: the primal and its input's tangents (K folded into the
    batch) as one convolution of the two joined along the batch, which is exact (the op is
    linear in its input, and each batch element is convolved on its own). Inductor writes
    a primal and its tangent into the joined input from the kernel that computes both,
    where two convolutions each needed their input laid out by a kernel of its own
    (the CNN's compiled JVP: 9 kernels to compile against the primal's 4). None where this
    does not apply (a bias, which the tangents must not get; a weight with a tangent; no
    input tangent, or one of another dtype)."""
    x, b, tx, tw = p[0], p[2], t[0], t[1]
    if b is not None or tw is not None or tx is None or tx.dtype != x.dtype or not triton_kernels.under_inductor():
        return None
    n, k = x.shape[0], tx.shape[0]
    both = aten.convolution.default(torch.cat([x, tx.reshape((k * n,) + tuple(x.shape[1:]))]), *p[1:])
    y = both[:n]
    return y, both[n:].reshape((k,) + tuple(y.shape))


reg(aten.convolution.default, _convolution)


# ---- dropout --------------------------------------------------------------------------------
def _native_dropout(p, t):
    x, prob, train = p
    out, mask = aten.native_dropout.default(x, prob, train)
    if t[0] is None:
        return (out, mask), None
    if train is False:
        return (out, mask), (t[0], None)
    scale = 0.0 if prob >= 1 else 1.0 / (1.0 - prob)
    return (out, mask), (t[0] * mask * scale, None)


reg(aten.native_dropout.default, _native_dropout)


# ---- losses ------------------------------------------------------------------------------------

def _ctc_loss_rule(op, backward):
    """CTC: nll[n] depends on log_probs[:, n] only, so one backward call gives every row
    of the Jacobian. PyTorch's backward is the gradient *through a log_softmax* (it adds
    exp(log_probs) for t < input_length); that term is taken back out. zero_infinity:
    an infinite loss reads as 0, with tangent 0. log_alpha is the backward's workspace:
    its tangent is not computed and comes back NaN, so that any use of it shows."""
    def rule(p, t):
        lp, targets, il, tl, blank, zero_inf = p
        outs = call_op(op, p)
        if t[0] is None:
            return outs, None
        if lp.dim() != 3:
            raise NotImplementedError(f"torch_fwd: {op} rule expects log_probs of shape (T, N, C)")
        nll, log_alpha = call_op(op, (lp, targets, il, tl, blank, False))
        grad = call_op(backward, (torch.ones_like(nll), lp, targets, il, tl, nll, log_alpha, blank, False))
        lengths = il if isinstance(il, torch.Tensor) else torch.tensor(il, device=lp.device)
        valid = torch.arange(lp.shape[0], device=lp.device)[:, None] < lengths.to(lp.device)[None, :]
        grad = grad - lp.exp() * valid[..., None].to(lp.dtype)
        tn = (t[0] * grad).sum(dim=(1, 3))
        if zero_inf:
            tn = torch.where(torch.isinf(nll), torch.zeros_like(tn), tn)
        return outs, (tn, torch.full((t[0].shape[0],) + tuple(outs[1].shape), float("nan"),
                                     dtype=lp.dtype, device=lp.device))
    return rule


reg(aten._ctc_loss.default, _ctc_loss_rule(aten._ctc_loss.default, aten._ctc_loss_backward.default))
reg(aten._ctc_loss.Tensor, _ctc_loss_rule(aten._ctc_loss.Tensor, aten._ctc_loss_backward.Tensor))


def _chunked_linear_cross_entropy_rule(op, reduced):
    """F.linear_cross_entropy's chunked custom ops compute the loss and, for mean/sum, its
    gradients inside forward; their backward only scales those, so neither PyTorch's
    forward AD nor the double-vjp identity sees the true derivative (torch.func.jvp
    returns a wrong tangent). The loss tangent comes from the unchunked math on Duals;
    the precomputed gradients' tangents (second derivatives) are not computed and come
    back NaN, so that any use of them shows."""
    from torch_fwd.dual import run_with_duals

    def rule(p, t):
        outs = call_op(op, p)
        if reduced:
            inp, w, target, b, cls_w, reduction, ignore_index, smoothing = p[:8]
        else:
            (inp, w, target, b, cls_w, ignore_index), reduction, smoothing = p[:6], "none", 0.0

        def loss(i, w_, b_, cw):
            return F.cross_entropy(F.linear(i, w_, b_), target, weight=cw, reduction=reduction,
                                   ignore_index=ignore_index, label_smoothing=smoothing)
        _, tl = run_with_duals(loss, (inp, w, b, cls_w), {}, (t[0], t[1], t[3], t[4]), {})
        if not reduced:
            return outs, tl
        k = next(x for x in t if x is not None).shape[0]
        nan = [torch.full((k,) + tuple(g.shape), float("nan"), dtype=g.dtype, device=g.device) for g in outs[1:]]
        return outs, (tl, *nan)
    return rule


try:
    import torch.nn.modules.linear_cross_entropy  # noqa: F401  (defines the torch_nn:: ops)
    _LCE = torch.ops.torch_nn._linear_cross_entropy_batch_chunked.default
    _LCE_NONE = torch.ops.torch_nn._linear_cross_entropy_batch_chunked_no_reduction.default
except (ImportError, AttributeError):  # a PyTorch without the chunked path
    _LCE = _LCE_NONE = None
if _LCE is not None:
    reg(_LCE, _chunked_linear_cross_entropy_rule(_LCE, True))
    reg(_LCE_NONE, _chunked_linear_cross_entropy_rule(_LCE_NONE, False))


# ---- attention --------------------------------------------------------------------------------
def _expand_kv(x, hq):
    """Grouped-query attention: repeat key/value heads (dim -3) to the query's head count."""
    if x is None or x.dim() < 3 or x.shape[-3] == hq:
        return x
    return x.repeat_interleave(hq // x.shape[-3], dim=-3)


def attention_jvp(q, k, v, mask, tq, tk, tv, tmask, scale, is_causal, dropout_p=0.0, with_out=True):
    """Math attention and its tangent, on any backend. Returns (out, tangent_out); out is
    None unless ``with_out`` (the rules take the primal from the fused op).

    dS = s (dQ K^T + Q dK^T) + dM;  dP = P (dS - rowsum(P dS));  dO = dP V + P dV.
    Materialises the L x S scores per direction: the Triton flash kernel avoids that on CUDA.
    """
    hq = q.shape[-3] if q.dim() >= 3 else None
    if hq is not None:
        k, v, tk, tv = _expand_kv(k, hq), _expand_kv(v, hq), _expand_kv(tk, hq), _expand_kv(tv, hq)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kT, tkT = k.transpose(-1, -2), None if tk is None else tk.transpose(-1, -2)
    opaque = _layout_copies_opaque()
    if opaque:
        qs, tqs = q, tq  # the scale on the scores below, fused into the softmax's kernel
    else:
        # the scale on q (L x D) rather than on the scores and their tangent (L x S each)
        qs, tqs = q * s, None if tq is None else tq * s
    joined = _joined(qs, kT, tqs, tkT, opaque)
    if joined is not None:
        # [Q | dQ] and [dK^T ; K^T]: the scores are the product of two halves, their
        # tangent the product of the wholes (see _joined)
        qj, kj = joined
        d = q.shape[-1]
        scores, dS = qj[..., :d] @ kj[..., d:, :], (qj @ kj).unsqueeze(0)
    else:
        scores, dS = qs @ kT, product_tangent(qs, kT, tqs, tkT)
    if opaque:
        scores, dS = scores * s, None if dS is None else dS * s
    # (both products before the softmax: Inductor, which keeps this order for a JVP graph,
    # can then fuse the softmax's reductions with its tangent's)
    L, S = q.shape[-2], k.shape[-2]
    blocked = None  # the positions a causal or boolean mask sets to -inf
    if is_causal:
        blocked = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
    if mask is not None and mask.dtype == torch.bool:
        blocked = ~mask if blocked is None else blocked | ~mask
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    P = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        keep = torch.bernoulli(torch.full_like(P, 1 - dropout_p)) / (1 - dropout_p)
        Pd = P * keep
    else:
        keep, Pd = None, P
    out = Pd @ v if with_out else None
    if tmask is not None:
        dS = tadd(dS, tmask)
    dP = None
    if dS is not None:
        if blocked is not None:
            # no direction moves a blocked score: a non-finite key or query tangent there
            # must not reach the row's sum as inf * 0 (a float mask's -inf entries are
            # not looked for: that would be a pass over every masked call's scores)
            dS = dS.masked_fill(blocked, 0.0)
        dP = softmax_tangent(P, dS, -1)
        if keep is not None:
            dP = dP * keep
    joined = _joined(Pd, v, dP, tv)
    if joined is not None:
        return out, (joined[0] @ joined[1]).unsqueeze(0)
    return out, product_tangent(Pd, v, dP, tv)


def _layout_copies_opaque() -> bool:
    """Whether attention's layout copies are opaque ATen calls: in a graph Inductor compiles
    (for_inductor) that autograd will not differentiate. Each copy sits between two extern
    calls (the projections' matmuls and the scores' bmm; the bmm giving the output's
    tangent and the out-projection), so Inductor would compile it as a C++ kernel of its
    own, a g++ run (~1 s on these CPUs) for a copy ATen does as fast: the joined [Q | dQ]
    and [dK^T ; K^T] (with the scale moved onto the scores, which fuse into the softmax's
    kernel) and the output's tangent laid out as the primal output is (the fused op's
    (B, S, H, D) in memory, so the out-projection reads it as a view). The transformer
    block's compiled JVP: 7 C++ kernels -> 5, against the primal's 4."""
    return triton_kernels.under_inductor() and not for_autograd()


def _restrided(t, stride):
    """``t`` copied into ``stride`` (an opaque ATen copy, see _layout_copies_opaque): strides
    of a dense, non-overlapping layout (the caller checks), or elements would share memory."""
    return torch.ops.torch_fwd.restrided.default(t, list(stride))


_LIB = torch.library.Library("torch_fwd", "FRAGMENT")  # (kept alive: it holds the ops)
_LIB.define("layout_cat(Tensor[] tensors, int dim) -> Tensor")
_LIB.impl("layout_cat", lambda tensors, dim: torch.cat(tensors, dim), "CompositeExplicitAutograd")
torch.library.register_fake("torch_fwd::layout_cat", lambda tensors, dim: torch.cat(tensors, dim), lib=_LIB)
_LIB.define("restrided(Tensor t, int[] stride) -> Tensor")


def _restrided_impl(t, stride):
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


_LIB.impl("restrided", _restrided_impl, "CompositeExplicitAutograd")
torch.library.register_fake("torch_fwd::restrided",
                            lambda t, stride: torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device),
                            lib=_LIB)


def _joined(a, b, ta, tb, opaque=False):
    """([A | dA], [dB ; B]) for one direction (K = 1) with both tangents: their product is
    A dB + dA B, the tangent of A @ B, in one batched matmul. Attention's operands are
    copied into contiguous (batch, L, D) blocks for its bmm anyway (the projections' layout
    puts the sequence between batch and heads); joined, a primal and its tangent are
    copied together (by one kernel under Inductor, or, ``opaque``, by one ATen call: see
    _layout_copies_opaque), and Inductor can fuse the scores' softmax with their tangent's
    (the transformer block's compiled JVP: 10 kernels to compile -> 7, with
    backend.JVP_INDUCTOR_SETTINGS). None where this does not apply: K > 1 (the tangents
    carry a dimension the primal does not), an absent tangent (one product already), a
    tangent of another dtype (the primal's products must not be promoted)."""
    if ta is None or tb is None or ta.shape[0] != 1 or tb.shape[0] != 1 \
            or ta.dtype != a.dtype or tb.dtype != b.dtype:
        return None
    cat = torch.ops.torch_fwd.layout_cat.default if opaque else torch.cat
    return cat([a, ta[0]], -1), cat([tb[0], b], -2)


def _sdpa_rule(op, mask_pos, dropout_pos, causal_pos, n_out):
    def args(p, t):
        mask = p[mask_pos] if mask_pos is not None else None
        tmask = t[mask_pos] if mask_pos is not None else None
        return p[:3], mask, t[:3], tmask, p[dropout_pos], p[causal_pos], p[-1]

    def rule(p, t):
        (q, k, v), mask, (tq, tk, tv), tmask, dropout_p, is_causal, scale = args(p, t)
        if dropout_p > 0:
            # The fused kernel's dropout mask cannot be reproduced: compute both sides in
            # math with one mask, a valid sample of the same distribution.
            out, tout = attention_jvp(q, k, v, mask, tq, tk, tv, tmask, scale, is_causal, dropout_p)
            primal = list(call_op(op, p))
            primal[0] = out
            return tuple(primal), (tout,) + (None,) * (n_out - 1)
        primal = call_op(op, p)
        _, tout = attention_jvp(q, k, v, mask, tq, tk, tv, tmask, scale, is_causal, with_out=False)
        out = primal[0]
        if tout is not None and tout.shape[0] == 1 and tout.stride()[1:] != out.stride() \
                and _layout_copies_opaque() and is_non_overlapping_and_dense_or_false(out):
            tout = _restrided(tout[0], out.stride()).unsqueeze(0)
        return primal, (tout,) + (None,) * (n_out - 1)

    def flash_kernel(p, t):
        """The tangent from the Triton flash-attention JVP (no L x S scores), the primal
        from the op itself."""
        from torch_fwd.triton_kernels import attention
        (q, k, v), mask, (tq, tk, tv), tmask, dropout_p, is_causal, scale = args(p, t)
        if not attention.applies(q, k, v, mask, tq, tk, tv, tmask, dropout_p):
            return None
        _, tout = attention.flash_attention_jvp(q, k, v, tq, tk, tv, mask, attention.default_scale(q, scale), is_causal)
        return call_op(op, p), (tout,) + (None,) * (n_out - 1)
    return with_kernel(rule, flash_kernel, under_inductor=True)


reg(aten._scaled_dot_product_flash_attention_for_cpu.default,
    _sdpa_rule(aten._scaled_dot_product_flash_attention_for_cpu.default, 5, 3, 4, 2))
reg(aten._scaled_dot_product_efficient_attention.default,
    _sdpa_rule(aten._scaled_dot_product_efficient_attention.default, 3, 5, 6, 4))
reg(aten._scaled_dot_product_flash_attention.default,
    _sdpa_rule(aten._scaled_dot_product_flash_attention.default, None, 3, 4, 9))
reg(aten._scaled_dot_product_cudnn_attention.default,
    _sdpa_rule(aten._scaled_dot_product_cudnn_attention.default, 3, 5, 6, 9))


def _sdpa_cpu_backward_reference(grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, attn_mask=None,
                                 scale=None):
    """The CPU flash attention's backward in math ops (scores recomputed; ``out`` and
    ``logsumexp`` unused): what a Hessian through attention differentiates."""
    if dropout_p > 0:
        raise NotImplementedError("torch_fwd: the backward of attention with dropout cannot be differentiated: "
                                  "its dropout mask is not reproducible")
    hq, hk = q.shape[-3], k.shape[-3]
    ke, ve = _expand_kv(k, hq), _expand_kv(v, hq)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ ke.transpose(-1, -2)) * s
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    P = torch.softmax(scores, dim=-1)
    dv = P.transpose(-1, -2) @ grad_out
    dP = grad_out @ ve.transpose(-1, -2)
    dS = P * (dP - (P * dP).sum(-1, keepdim=True))
    dq = (dS @ ke) * s
    dk = (dS.transpose(-1, -2) @ q) * s
    if hk != hq:  # grouped-query attention: each key/value head served hq // hk query heads
        g = hq // hk
        dk = dk.unflatten(-3, (hk, g)).sum(-3)
        dv = dv.unflatten(-3, (hk, g)).sum(-3)
    return dq, dk, dv


reg(aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    decompose_with(_sdpa_cpu_backward_reference, aten._scaled_dot_product_flash_attention_for_cpu_backward.default))


def _mha_reference(query, key, value, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, mask=None,
                   need_weights=True, average_attn_weights=True, mask_type=None):
    """nn.MultiheadAttention's fused inference fast path, in plain ops."""
    Fn = torch.nn.functional
    B, L, E = query.shape
    S = key.shape[1]
    head = E // num_heads
    (w_q, w_k, w_v), (b_q, b_k, b_v) = qkv_w.chunk(3), qkv_b.chunk(3)
    q = Fn.linear(query, w_q, b_q).reshape(B, L, num_heads, head).transpose(1, 2)
    k = Fn.linear(key, w_k, b_k).reshape(B, S, num_heads, head).transpose(1, 2)
    v = Fn.linear(value, w_v, b_v).reshape(B, S, num_heads, head).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head)
    if mask is not None:
        if mask_type == 1:  # key padding (B, S)
            mask = mask.reshape(B, 1, 1, S)
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    p = torch.softmax(scores, dim=-1)
    out = Fn.linear((p @ v).transpose(1, 2).reshape(B, L, E), proj_w, proj_b)
    if not need_weights:
        return out, out.new_empty(0)
    return out, p.mean(1) if average_attn_weights else p


reg(aten._native_multi_head_attention.default, decompose_with(_mha_reference))


def _encoder_layer_reference(src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first, eps,
                             n1_w, n1_b, n2_w, n2_b, ff1_w, ff1_b, ff2_w, ff2_b, mask=None, mask_type=None):
    """nn.TransformerEncoderLayer's fused inference fast path, in plain ops (its slow path);
    its self-attention is the multi-head attention fast path's reference."""
    Fn = torch.nn.functional
    E = src.shape[-1]

    def attention(x):
        return _mha_reference(x, x, x, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, mask,
                              need_weights=False, mask_type=mask_type)[0]

    def feed_forward(x):
        h = Fn.linear(x, ff1_w, ff1_b)
        return Fn.linear(Fn.gelu(h) if use_gelu else Fn.relu(h), ff2_w, ff2_b)
    if norm_first:
        x = src + attention(Fn.layer_norm(src, (E,), n1_w, n1_b, eps))
        return x + feed_forward(Fn.layer_norm(x, (E,), n2_w, n2_b, eps))
    x = Fn.layer_norm(src + attention(src), (E,), n1_w, n1_b, eps)
    return Fn.layer_norm(x + feed_forward(x), (E,), n2_w, n2_b, eps)


reg(aten._transformer_encoder_layer_fwd.default, decompose_with(_encoder_layer_reference))


F = torch.nn.functional
SDPA = F.scaled_dot_product_attention
_FROZEN_CONV_W = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _qkv(b=2, h=2, L=5, S=6, e=8, hk=None):
    return randn(b, h, L, e), randn(b, hk or h, S, e), randn(b, hk or h, S, e)


def _chunked_lce_options():
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
    return LinearCrossEntropyOptions(batch_chunk_size=2)


TEST_CASES = [
    case("softmax", lambda x: torch.softmax(x, -1), lambda: (randn(3, 4),)),
    case("log_softmax", lambda x: torch.log_softmax(x, 0), lambda: (randn(3, 4),)),
    case("softmax_of_a_scalar", lambda x: torch.softmax(x, 0) * x, lambda: (randn(),)),
    case("log_softmax_of_a_scalar", lambda x: torch.log_softmax(x, -1) + x, lambda: (randn(),)),
    case("layer_norm", lambda x, w, b: F.layer_norm(x, (4,), w, b), lambda: (randn(3, 4), randn(4), randn(4))),
    case("layer_norm_2d_noaffine", lambda x: F.layer_norm(x, (3, 4)), lambda: (randn(2, 3, 4),)),
    case("rms_norm", lambda x, w: F.rms_norm(x, (4,), w, eps=1e-6), lambda: (randn(3, 4), randn(4))),
    case("batch_norm_train", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
         lambda: (randn(4, 3, 5), randn(3), randn(3))),
    case("batch_norm_eval", lambda x, w, b: F.batch_norm(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype) * 2, w, b),
         lambda: (randn(4, 3, 2, 2), randn(3), randn(3))),
    case("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), lambda: (randn(2, 4, 3, 3), randn(4), randn(4))),
    case("conv1d", lambda x, w, b: F.conv1d(x, w, b, padding=1), lambda: (randn(2, 3, 7), randn(4, 3, 3), randn(4))),
    case("conv2d_stride_groups", lambda x, w: F.conv2d(x, w, stride=2, groups=2), lambda: (randn(2, 4, 6, 6), randn(6, 2, 3, 3))),
    case("conv_transpose2d", lambda x, w: F.conv_transpose2d(x, w, stride=2), lambda: (randn(1, 2, 3, 3), randn(2, 3, 2, 2))),
    # (a weight without a tangent: in graphs for Inductor, one convolution of the input and its tangents)
    case("conv2d_frozen_weight", lambda x: F.conv2d(x, _FROZEN_CONV_W, padding=1, stride=(1, 2)), lambda: (randn(2, 3, 5, 6),)),
    case("dropout_eval", lambda x: F.dropout(x, 0.5, training=False), lambda: (randn(3, 4),)),
    case("rrelu_eval", lambda x: F.rrelu(x, 0.1, 0.3, training=False), lambda: (randn(3, 4),)),
    # every output, saved statistics included (torch.func.jvp gets those wrong: FD only)
    case("native_batch_norm_all_outputs", lambda x, w, b: aten.native_batch_norm(
        x, w, b, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), True, 0.5, 0.6),
        lambda: (randn(4, 3, 5), randn(3), randn(3)), check_torch_func=False),
    case("batch_norm_legit_no_stats", lambda x, w, b: aten._native_batch_norm_legit.no_stats(x, w, b, True, 0.1, 1e-5),
         lambda: (randn(4, 3, 5), randn(3), randn(3)), check_torch_func=False),
    case("batch_norm_legit_no_training", lambda x, w, b: aten._native_batch_norm_legit_no_training(
        x, w, b, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype) * 2, 0.1, 1e-5)[0],
        lambda: (randn(4, 3, 5), randn(3), randn(3))),
    case("batch_norm_with_update", lambda x, w, b: torch.ops.aten._batch_norm_with_update(
        x, w, b, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), 0.1, 1e-5)[0],
        lambda: (randn(4, 3, 5), randn(3), randn(3))),
    # eval mode reads the running statistics: their tangents reach the output
    case("batch_norm_eval_stat_tangents", lambda x, rm, rv, w: F.batch_norm(x, rm, rv, w, training=False),
         lambda: (randn(4, 3, 2), randn(3), randn(3, positive=True), randn(3)), check_torch_func=False),
    # functional variants return the new running statistics, which move with the batch
    case("batch_norm_functional_new_stats", lambda x, rm, rv, w, b: aten._native_batch_norm_legit_functional(
        x, w, b, rm, rv, True, 0.3, 1e-5), lambda: (randn(4, 3, 5), randn(3), randn(3, positive=True), randn(3), randn(3)),
        check_torch_func=False),
    case("batch_norm_functional_eval", lambda x, rm, rv: aten._native_batch_norm_legit_functional(
        x, None, None, rm, rv, False, 0.3, 1e-5), lambda: (randn(4, 3, 5), randn(3), randn(3, positive=True)),
        check_torch_func=False),
    case("sdpa", SDPA, lambda: _qkv()),
    case("sdpa_causal_scale", lambda q, k, v: SDPA(q, k, v, is_causal=True, scale=0.3), lambda: _qkv(S=5)),
    case("sdpa_bool_mask", lambda q, k, v, m: SDPA(q, k, v, attn_mask=m), lambda: _qkv() + (torch.rand(5, 6) > 0.3,)),
    case("sdpa_float_mask_tangent", lambda q, k, v, m: SDPA(q, k, v, attn_mask=m), lambda: _qkv() + (randn(5, 6),)),
    case("sdpa_gqa", lambda q, k, v: SDPA(q, k, v, enable_gqa=True), lambda: _qkv(h=4, hk=2), check_torch_func=False),
    # the backward (what a Hessian through attention differentiates), every input moving
    case("sdpa_cpu_backward_causal", lambda g, q, k, v: aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, *aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.4), 0.0, True,
        scale=0.4), lambda: (randn(2, 2, 5, 8),) + _qkv(S=5), check_torch_func=False),
    case("sdpa_cpu_backward_mask", lambda g, q, k, v, m: aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, *aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=m), 0.0, False,
        attn_mask=m), lambda: (randn(2, 2, 5, 8),) + _qkv(S=5) + (randn(5, 5),), check_torch_func=False),
    case("cross_entropy", lambda x: F.cross_entropy(x, torch.tensor([1, 0, 3])), lambda: (randn(3, 4),)),
    # unnormalised log_probs too: PyTorch's backward assumes a log_softmax before it
    *([case("linear_cross_entropy_chunked", lambda x, w, b: sum(F.linear_cross_entropy(
        x, w, torch.tensor([1, 0, 3, 2, 2]), linear_bias=b, reduction=r, label_smoothing=0.1 if r != "none" else 0.0,
        options=_chunked_lce_options()).sum() for r in ("mean", "sum", "none")),
        lambda: (randn(5, 3), randn(4, 3), randn(4)), check_torch_func=False, graph=False)]  # it warns: a graph break
      if hasattr(F, "linear_cross_entropy") else []),  # (torch 2.13 and later)
    case("ctc_loss", lambda lp: F.ctc_loss(lp, torch.tensor([[1, 2, 2], [3, 1, 0]]), [6, 5], [3, 2], reduction="none"),
         lambda: (randn(6, 2, 4),), check_torch_func=False, graph=False),  # dynamo: data-dependent shapes
    case("ctc_loss_mean_zero_infinity", lambda lp: F.ctc_loss(lp.log_softmax(-1), torch.tensor([[1, 1, 1, 1], [3, 1, 0, 0]]),
                                                              torch.tensor([3, 5]), torch.tensor([4, 2]), zero_infinity=True),
         lambda: (randn(5, 2, 4),), check_torch_func=False, graph=False),
    case("mse_loss", lambda x, y: F.mse_loss(x, y), lambda: (randn(3, 4), randn(3, 4))),
    case("max_pool2d", lambda x: F.max_pool2d(x, 2), lambda: (randn(1, 2, 4, 4),)),
    case("max_pool2d_strided_padded_unbatched", lambda x: F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True),
         lambda: (randn(2, 5, 6),)),
    case("max_pool3d_dilated", lambda x: F.max_pool3d(x, 2, dilation=2), lambda: (randn(1, 2, 5, 5, 5),)),
    case("max_pool1d", lambda x: F.max_pool1d(x, 2), lambda: (randn(2, 3, 6),)),
    case("avg_pool2d", lambda x: F.avg_pool2d(x, 2), lambda: (randn(1, 2, 4, 4),)),
    case("avg_pool2d_unbatched_padded", lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), lambda: (randn(2, 5, 5),)),
    case("avg_pool3d_ceil", lambda x: F.avg_pool3d(x, 2, ceil_mode=True), lambda: (randn(2, 1, 3, 4, 5),)),
    case("avg_pool1d", lambda x: F.avg_pool1d(x, 2), lambda: (randn(2, 3, 6),)),
    case("interpolate", lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), lambda: (randn(1, 2, 3, 3),)),
]
