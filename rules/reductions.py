"""Reductions: sum, mean, prod, amax/amin, max/min, norms, var/std, logsumexp, cumsum,
cumprod, sort/topk values. Dims are primal dims; ``shift_dims`` moves them past the chunk."""
import torch
import torch.nn.functional as F

from torch_fwd.combinators import linear, shift_dim, shift_dims, zero
from torch_fwd.registry import call_op, library_rule as reg
from torch_fwd.tangent import align, tadd

from ._cases import case, rand, randn

aten = torch.ops.aten


def _dims(dim, ndim):
    """A reduction's dims as tangent dims (None or [] mean every dim; a 0-d tensor has none)."""
    if ndim == 0:
        return []
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(1, ndim + 1)) if ndim > 0 else []
    if isinstance(dim, int):
        dim = [dim]
    return shift_dims(dim, ndim)


def _sum(t, dims, keepdim=False, dtype=None):
    if not dims:
        return t if dtype is None else t.to(dtype)
    return t.sum(dim=dims, keepdim=keepdim, dtype=dtype)


reg(aten.sum.default, linear(aten.sum.default, lambda t, x, dtype=None: _sum(t, _dims(None, x.dim()), dtype=dtype)))
reg(aten.sum.dim_IntList, linear(aten.sum.dim_IntList, lambda t, x, dim, keepdim=False, dtype=None:
                                 _sum(t, _dims(dim, x.dim()), keepdim, dtype)))
reg(aten.mean.default, linear(aten.mean.default, lambda t, x, dtype=None: t.mean(dim=_dims(None, x.dim()), dtype=dtype)
                              if x.dim() else t))
reg(aten.mean.dim, linear(aten.mean.dim, lambda t, x, dim, keepdim=False, dtype=None:
                          t.mean(dim=_dims(dim, x.dim()), keepdim=keepdim, dtype=dtype) if x.dim() else t))
reg(aten.cumsum.default, linear(aten.cumsum.default, lambda t, x, dim, dtype=None: t.cumsum(shift_dim(dim, x.dim()), dtype=dtype)))


def _prod_except(x, dim):
    """prod over ``dim`` of every element but one, without dividing (exact at zeros)."""
    ones = torch.ones_like(x.narrow(dim, 0, 1))
    left = torch.cat([ones, x.narrow(dim, 0, x.shape[dim] - 1)], dim).cumprod(dim)
    right = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), ones], dim).flip(dim).cumprod(dim).flip(dim)
    return left * right


def _prod_rule(p, t):
    x = p[0]
    y = call_op(aten.prod.default, p)
    if t[0] is None:
        return y, None
    flat = x.reshape(-1)
    d = _prod_except(flat, 0)
    return y, (t[0].reshape(t[0].shape[0], -1) * d).sum(1).to(y.dtype)


def _prod_dim_rule(p, t):
    x, dim, keepdim = p[0], p[1], p[2]
    y = call_op(aten.prod.dim_int, p)
    if t[0] is None:
        return y, None
    if x.dim() == 0:
        return y, t[0]
    d = _prod_except(x, dim % x.dim())
    return y, (t[0] * d).sum(shift_dim(dim, x.dim()), keepdim=keepdim).to(y.dtype)


def _cumprod_rule(p, t):
    """dy_k = sum_{j<=k} dx_j prod_{i<j} x_i prod_{j<i<=k} x_i, without dividing (exact at
    zeros; n^2 in the scanned dim's length n)."""
    x, dim, dtype = p
    y = call_op(aten.cumprod.default, p)
    if t[0] is None:
        return y, None
    if x.dim() == 0:
        return y, t[0].to(y.dtype)
    if dtype is not None:
        x = x.to(dtype)
    d = dim % x.dim()
    xm = x.movedim(d, -1)
    n = xm.shape[-1]
    before = torch.cat([torch.ones_like(xm[..., :1]), xm[..., :-1]], -1).cumprod(-1)  # prod_{i<j}
    idx = torch.arange(n, device=x.device)
    later = idx[None, :] > idx[:, None]  # [j, i]: i after j
    after = torch.where(later, xm.unsqueeze(-2), torch.ones_like(xm).unsqueeze(-2)).cumprod(-1)
    after = after * (idx[None, :] >= idx[:, None]).to(after.dtype)  # [j, k]: prod_{j<i<=k}, 0 for k < j
    tm = t[0].to(xm.dtype).movedim(d + 1, -1)
    dy = ((tm * before).unsqueeze(-1) * after).sum(-2)
    return y, dy.movedim(-1, d + 1)


reg(aten.prod.default, _prod_rule)
reg(aten.cumprod.default, _cumprod_rule)
reg(aten.prod.dim_int, _prod_dim_rule)


def _extreme_rule(op):
    """amax/amin and full max/min: the tangent of the selected elements, ties averaged
    (PyTorch's convention for these reductions)."""
    def rule(p, t):
        x = p[0]
        y = call_op(op, p)
        if t[0] is None:
            return y, None
        if op in (aten.amax.default, aten.amin.default):
            dim, keepdim = p[1], p[2]
        else:
            dim, keepdim = [], False
        if x.dim() == 0:
            return y, t[0]
        tdims = _dims(dim, x.dim())
        mask = (x == _keepdims(y, tdims, keepdim)).to(x.dtype)
        count = mask.sum(dim=[d - 1 for d in tdims], keepdim=True)
        return y, (t[0] * (mask / count)).sum(dim=tdims, keepdim=keepdim)
    return rule


def _keepdims(y, tdims, keepdim):
    """A reduction's result with its reduced dims back as size 1, to broadcast against the
    input; ``tdims`` are tangent dims as :func:`_dims` gives them."""
    if keepdim:
        return y
    for d in sorted(tdims):
        y = y.unsqueeze(d - 1)
    return y


for _op in (aten.amax.default, aten.amin.default, aten.max.default, aten.min.default):
    reg(_op, _extreme_rule(_op))


def _indexed_values_rule(op, dim_pos):
    """max.dim/min.dim/sort/topk/kthvalue/median.dim/mode: values = gather(x, indices)."""
    def rule(p, t):
        values, indices = call_op(op, p)[:2]
        x = p[0]
        if t[0] is None:
            return (values, indices), None
        if x.dim() == 0:
            return (values, indices), (t[0], None)
        dim = p[dim_pos] if dim_pos is not None else -1
        k = t[0].shape[0]
        keepdim = values.dim() == x.dim()
        idx = indices if keepdim else indices.unsqueeze(dim % x.dim())
        tv = t[0].gather(shift_dim(dim, x.dim()), idx.unsqueeze(0).expand((k,) + tuple(idx.shape)))
        if not keepdim:
            tv = tv.squeeze(shift_dim(dim, x.dim()))
        return (values, indices), (tv, None)
    return rule


for _op, _pos in [(aten.max.dim, 1), (aten.min.dim, 1), (aten.sort.default, 1), (aten.sort.stable, 2),
                  (aten.topk.default, 2), (aten.kthvalue.default, 2), (aten.median.dim, 1), (aten.mode.default, 1)]:
    reg(_op, _indexed_values_rule(_op, _pos))

for _op in (aten.argmax.default, aten.argmin.default, aten.argsort.default, aten.argsort.stable,
            aten.any.default, aten.any.dim, aten.all.default, aten.all.dim, aten.count_nonzero.default,
            aten.count_nonzero.dim_IntList):
    reg(_op, zero(_op))


def _vector_norm(p, t):
    x, ord_, dim, keepdim, dtype = p
    y = call_op(aten.linalg_vector_norm.default, p)
    if t[0] is None:
        return y, None
    tx = t[0] if dtype is None else t[0].to(dtype)
    xs = x if dtype is None else x.to(dtype)
    dims = _dims(dim, x.dim())
    yk = _keepdims(y, dims, keepdim)
    ord_ = float(ord_)
    if ord_ == 0.0:
        return y, None
    if ord_ == 1.0:
        d = torch.sign(xs)
    elif ord_ == 2.0:
        d = torch.where(yk == 0, torch.zeros_like(xs), xs / yk)
    elif ord_ in (float("inf"), float("-inf")):
        a = xs.abs()
        mask = (a == yk).to(xs.dtype)
        d = torch.sign(xs) * mask / mask.sum(dim=[i - 1 for i in dims] or None, keepdim=True)
    else:
        d = torch.where(yk == 0, torch.zeros_like(xs), torch.sign(xs) * xs.abs().pow(ord_ - 1) / yk.pow(ord_ - 1))
    return y, _sum(tx * d, dims, keepdim)


reg(aten.linalg_vector_norm.default, _vector_norm)


def _pairwise_norm_tangent(diff, tdiff, p_norm):
    """The tangent of ||diff||_p over the last dim along tdiff: vector_norm's rule."""
    return _vector_norm((diff, p_norm, [-1], False, None), (tdiff, None, None, None, None))[1]


def _cdist(p, t):
    """cdist(x1, x2, p)[..., i, j] = ||x1[..., i, :] - x2[..., j, :]||_p, by vector_norm's
    rule on the pairwise differences (PyTorch's own kernel gives the primal)."""
    x1, x2, p_norm = p[0], p[1], p[2]
    y = call_op(aten._cdist_forward.default, p)
    t1, t2 = t[0], t[1]
    if t1 is None and t2 is None:
        return y, None
    diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)
    td = tadd(None if t1 is None else t1.unsqueeze(-2), None if t2 is None else -t2.unsqueeze(-3))
    return y, _pairwise_norm_tangent(diff, td.expand((td.shape[0],) + tuple(diff.shape)), p_norm)


def _pdist(p, t):
    """pdist(x, p): ||x[i] - x[j]||_p for i < j, in that order."""
    x, p_norm = p
    y = call_op(aten._pdist_forward.default, p)
    if t[0] is None:
        return y, None
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return y, _pairwise_norm_tangent(x[i] - x[j], t[0][:, i] - t[0][:, j], p_norm)


reg(aten._cdist_forward.default, _cdist)
reg(aten._pdist_forward.default, _pdist)


def _histogram_tangents(x, tx, w, tw, density, hist, edges, t_edges):
    """Counts do not move with x (zero derivative, the truth between bin edges); weighted
    counts are linear in the weights; density divides by the total and the bin widths,
    which move with the edges."""
    k = (tx if tx is not None else tw if tw is not None else t_edges).shape[0]
    t_counts = None
    if tw is not None:
        t_counts = torch.stack([aten.histogram.bins_tensor(x, edges, weight=tw[c])[0] for c in range(k)])
    if not density:
        return t_counts
    counts = aten.histogram.bins_tensor(x, edges, weight=w)[0]
    total, width = counts.sum(), edges[1:] - edges[:-1]
    t_hist = None
    if t_counts is not None:
        t_hist = t_counts / (total * width) - hist * (t_counts.sum(1, keepdim=True) / total)
    if t_edges is not None:
        t_hist = tadd(t_hist, -hist * (t_edges[:, 1:] - t_edges[:, :-1]) / width)
    return t_hist


def _histogram_bin_ct(p, t):
    x, bins, range_, w, density = p
    hist, edges = call_op(aten.histogram.bin_ct, p)
    tx, tw = t[0], t[3]
    if tx is None and tw is None:
        return (hist, edges), None
    t_edges = None
    if range_ is None and tx is not None and x.numel():
        # edges = linspace(min x, max x, bins + 1) (widened by 0.5 each side when min == max)
        # (the full min/max rules: ties share the tangent)
        t_lo, t_hi = (_extreme_rule(op)((x,), (tx,))[1] for op in (aten.min.default, aten.max.default))
        s = torch.linspace(0, 1, bins + 1, dtype=x.dtype, device=x.device)
        t_edges = t_lo[:, None] + (t_hi - t_lo)[:, None] * s
    return (hist, edges), (_histogram_tangents(x, tx, w, tw, density, hist, edges, t_edges), t_edges)


def _histogram_bins_tensor(p, t):
    x, bins, w, density = p
    hist, edges = call_op(aten.histogram.bins_tensor, p)
    tx, tb, tw = t[0], t[1], t[2]
    if tb is None and tw is None:
        return (hist, edges), None
    return (hist, edges), (_histogram_tangents(x, tx, w, tw, density, hist, edges, tb), tb)


reg(aten.histogram.bin_ct, _histogram_bin_ct)
reg(aten.histogram.bins_tensor, _histogram_bins_tensor)


def _var_like(op, is_std):
    def rule(p, t):
        x, dim, correction, keepdim = p[0], p[1], p[2], p[3]
        y = call_op(op, p)
        if t[0] is None:
            return y, None
        dims = _dims(dim, x.dim())
        pdims = [d - 1 for d in dims]
        n = 1
        for d in pdims:
            n *= x.shape[d]
        c = 1 if correction is None else correction
        mean = x.mean(dim=pdims or None, keepdim=True) if pdims else x
        # scaled before the sum, as PyTorch does: an empty reduction then gives 0, not 0 * inf
        scale = 2.0 / (n - c) if n != c else float("inf")
        dvar = _sum(t[0] * ((x - mean) * scale), dims, keepdim)
        if is_std:
            return y, dvar / (2 * y)
        return y, dvar
    return rule


reg(aten.var.correction, _var_like(aten.var.correction, False))
reg(aten.std.correction, _var_like(aten.std.correction, True))


def _var_mean(p, t):
    x, dim, correction, keepdim = p[0], p[1], p[2], p[3]
    var, mean = call_op(aten.var_mean.correction, p)
    if t[0] is None:
        return (var, mean), None
    _, tv = _var_like(aten.var.correction, False)(p, t)
    dims = _dims(dim, x.dim())
    tm = t[0].mean(dim=dims, keepdim=keepdim) if dims else t[0]
    return (var, mean), (tv, tm)


reg(aten.var_mean.correction, _var_mean)


def _logsumexp(p, t):
    x, dim, keepdim = p
    y = aten.logsumexp.default(x, dim, keepdim)
    if t[0] is None:
        return y, None
    dims = _dims(dim, x.dim())
    yk = _keepdims(y, dims, keepdim)
    w = torch.exp(x - yk)
    return y, _sum(t[0] * w, dims, keepdim)


reg(aten.logsumexp.default, _logsumexp)

TEST_CASES = [
    case("sum", torch.sum, lambda: (randn(3, 4),)),
    case("sum_dim", lambda x: x.sum(dim=(0, -1), keepdim=True), lambda: (randn(2, 3, 4),)),
    case("sum_dtype", lambda x: x.sum(1, dtype=torch.float32).double(), lambda: (randn(2, 3),), atol=1e-3, rtol=1e-3),
    case("sum_scalar", lambda x: x.sum(), lambda: (randn(),)),
    case("mean", lambda x: x.mean() + x.mean(-1).sum(), lambda: (randn(3, 4),)),
    case("prod", torch.prod, lambda: (randn(5),)),
    case("prod_with_zero", lambda x: torch.prod(x * (torch.arange(5.0, dtype=x.dtype) != 2)), lambda: (randn(5),)),
    case("prod_dim", lambda x: torch.prod(x, 1, keepdim=True), lambda: (randn(3, 4),)),
    case("amax", lambda x: torch.amax(x, dim=1), lambda: (randn(3, 4),)),
    case("amin_all", torch.amin, lambda: (randn(3, 4),)),
    case("max_full", torch.max, lambda: (randn(3, 4),)),
    case("max_dim", lambda x: torch.max(x, dim=1).values, lambda: (randn(3, 4),)),
    case("min_dim_keep", lambda x: torch.min(x, dim=0, keepdim=True)[0], lambda: (randn(3, 4),)),
    case("sort", lambda x: torch.sort(x, dim=-1, descending=True).values, lambda: (randn(3, 5),)),
    case("topk", lambda x: torch.topk(x, 2).values, lambda: (randn(3, 5),)),
    case("argmax_zero", lambda x: x.argmax().to(x.dtype) + x.sum(), lambda: (randn(3, 5),)),
    case("norm2", torch.linalg.vector_norm, lambda: (randn(3, 4),)),
    case("norm1_dim", lambda x: torch.linalg.vector_norm(x, 1, dim=1), lambda: (randn(3, 4),)),
    case("norm3", lambda x: torch.linalg.vector_norm(x, 3.0, dim=0, keepdim=True), lambda: (randn(3, 4),)),
    case("norm_inf", lambda x: torch.linalg.vector_norm(x, float("inf"), dim=1), lambda: (randn(3, 4),)),
    case("tensor_norm", lambda x: x.norm(), lambda: (randn(3, 4),)),
    case("cdist", lambda a, b: torch.cdist(a, b) + torch.cdist(a, b, p=1) + torch.cdist(a, b, p=3.5),
         lambda: (randn(2, 4, 3), randn(5, 3))),
    case("cdist_inf_and_one_side", lambda a, b: torch.cdist(a, b, p=float("inf")), lambda: (randn(4, 3), randn(5, 3)),
         argnums=(0,), check_torch_func=False),
    case("histogram_edges_weights_density", lambda x, w: sum(torch.histogram(x, 4, weight=w, density=d)[i].sum() * (i + 2)
                                                            for d in (False, True) for i in (0, 1)),
         lambda: (randn(7), rand(7, lo=0.5, hi=2.0)), check_torch_func=False),
    case("histogram_given_range_and_bins", lambda x, b, w: torch.histogram(x, b, weight=w, density=True).hist
         + torch.histogram(x, 3, range=(-3.0, 3.0), weight=w).hist,
         lambda: (randn(7), torch.tensor([-3.0, -0.5, 0.2, 3.0], dtype=torch.float64), rand(7, lo=0.5, hi=2.0)),
         check_torch_func=False),
    case("pdist", lambda x: F.pdist(x) + F.pdist(x, p=1.5), lambda: (randn(5, 3),), check_torch_func=False),
    case("var", lambda x: torch.var(x, dim=1), lambda: (randn(3, 4),)),
    case("std", lambda x: torch.std(x, dim=(0,), correction=0), lambda: (randn(3, 4),)),
    case("var_all", torch.var, lambda: (randn(3, 4),)),
    case("var_mean", lambda x: torch.var_mean(x, dim=1)[0] + torch.var_mean(x, dim=1)[1], lambda: (randn(3, 4),)),
    case("logsumexp", lambda x: torch.logsumexp(x, dim=1), lambda: (randn(3, 4),)),
    case("cumsum", lambda x: torch.cumsum(x, 1), lambda: (randn(3, 4),)),
    case("cumprod", lambda x: torch.cumprod(x, 1), lambda: (randn(3, 4),)),
    case("cumprod_dim0_dtype", lambda x: torch.cumprod(x, 0, dtype=torch.float64), lambda: (randn(4, 3),)),
    case("cumprod_zero", lambda x: torch.cumprod(x * (torch.arange(4.0, dtype=x.dtype) != 1), 1), lambda: (randn(3, 4),)),
]
