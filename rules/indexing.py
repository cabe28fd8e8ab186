"""Indexing: index/gather/index_select (linear in the source), scatter/index_put/masked_fill
(linear jointly in the destination and the written values), embedding."""
import torch

from torch_fwd.combinators import linear, shift_dim
from torch_fwd.registry import call_op, library_rule as reg
from torch_fwd.tangent import align, materialize

from ._cases import case, randn

aten = torch.ops.aten


def _kexp(idx, k):
    """An index tensor repeated over the chunk dimension (a view, no copy)."""
    return idx.unsqueeze(0).expand((k,) + tuple(idx.shape))


reg(aten.index.Tensor, linear(aten.index.Tensor, lambda t, x, indices: aten.index.Tensor(t, [None] + list(indices))))
reg(aten.index_select.default, linear(aten.index_select.default, lambda t, x, dim, index:
                                      t.index_select(shift_dim(dim, x.dim()), index)))
reg(aten.gather.default, linear(aten.gather.default, lambda t, x, dim, index, sparse_grad=False:
                                t.gather(shift_dim(dim, x.dim()), _kexp(index, t.shape[0]))))


def _chunk(t):
    for x in t:
        if isinstance(x, torch.Tensor):
            return x.shape[0]
        if isinstance(x, (list, tuple)):
            for y in x:
                if y is not None:
                    return y.shape[0]
    raise AssertionError("no active tangent")


def _scatter_src(op):
    def rule(p, t):
        x, dim, index, src = p[:4]
        y = op(*p) if op is not aten.scatter.reduce else op(*p[:4], reduce=p[4])
        if t[0] is None and t[3] is None:
            return y, None
        k = _chunk(t)
        tx, ts = materialize(t[0], x, k), materialize(t[3], src, k)
        d = shift_dim(dim, x.dim())
        if op is aten.scatter_add.default:
            return y, tx.scatter_add(d, _kexp(index, k), ts)
        return y, tx.scatter(d, _kexp(index, k), ts)
    return rule


reg(aten.scatter.src, _scatter_src(aten.scatter.src))
reg(aten.scatter_add.default, _scatter_src(aten.scatter_add.default))
reg(aten.scatter.value, linear(aten.scatter.value, lambda t, x, dim, index, value:
                               t.scatter(shift_dim(dim, x.dim()), _kexp(index, t.shape[0]), 0.0), homogeneous=False))


def _index_add(p, t):
    x, dim, index, src, alpha = p
    if x.dim() == 0:  # a scalar: the same as its one-element vector
        y, ty = _index_add((x.reshape(1), dim, index, src.reshape(-1), alpha),
                           (None if t[0] is None else t[0].reshape(-1, 1), None, None,
                            None if t[3] is None else t[3].reshape(t[3].shape[0], -1), None))
        return y.reshape(()), None if ty is None else ty.reshape(-1)
    y = aten.index_add.default(x, dim, index, src, alpha=alpha)
    if t[0] is None and t[3] is None:
        return y, None
    k = _chunk(t)
    tx, ts = materialize(t[0], x, k), materialize(t[3], src, k)
    return y, tx.index_add(shift_dim(dim, x.dim()), index, ts, alpha=alpha)


reg(aten.index_add.default, _index_add)


def _index_put(p, t):
    x, indices, values, accumulate = p
    y = aten.index_put.default(x, indices, values, accumulate)
    tx, tv = t[0], t[2]
    if tx is None and tv is None:
        return y, None
    k = _chunk(t)
    tx = materialize(tx, x, k)
    target_ndim = aten.index.Tensor(x, indices).dim()
    if tv is None:
        tv = torch.zeros((), dtype=x.dtype, device=x.device).expand((k,) + (1,) * target_ndim)
    else:
        tv = align(tv, target_ndim)
    return y, aten.index_put.default(tx, [None] + list(indices), tv.to(x.dtype), accumulate)


reg(aten.index_put.default, _index_put)


def _masked_fill_scalar(p, t):
    x, mask, value = p
    y = aten.masked_fill.Scalar(x, mask, value)
    if t[0] is None:
        return y, None
    return y, align(t[0], y.dim()).masked_fill(mask, 0.0)


def _masked_fill_tensor(p, t):
    x, mask, value = p
    y = aten.masked_fill.Tensor(x, mask, value)
    if t[0] is None and t[2] is None:
        return y, None
    k = _chunk(t)
    tx = align(materialize(t[0], x, k), y.dim())
    tv = t[2].reshape((k,) + (1,) * y.dim()) if t[2] is not None else 0.0
    return y, torch.where(mask, tv, tx) if t[2] is not None else tx.masked_fill(mask, 0.0)


reg(aten.masked_fill.Scalar, _masked_fill_scalar)
reg(aten.masked_fill.Tensor, _masked_fill_tensor)
reg(aten.embedding.default, linear(aten.embedding.default, lambda t, w, idx, *a: t[:, idx]))



def _embedding_bag(p, t):
    """sum/mean bags are linear in the weight and (sum) in per_sample_weights: the op
    itself applied to each tangent direction; max bags take the tangent of the row that
    won (empty bags give 0)."""
    weight, indices, offsets, scale, mode, sparse, psw, last, pad = p
    outs = call_op(aten._embedding_bag.default, p)
    tw, tpsw = t[0], t[6]
    if tw is None and tpsw is None:
        return outs, None
    out, _, bag_size, max_indices = outs
    if mode == 2:
        rows = max_indices.clamp(min=0)
        tout = tw[:, rows, torch.arange(weight.shape[1], device=weight.device)]
        tout = tout * (bag_size > 0).to(tout.dtype)[None, :, None]
    else:
        k = (tw if tw is not None else tpsw).shape[0]
        per_k = []
        for c in range(k):
            d = None
            if tw is not None:
                d = aten._embedding_bag.default(tw[c], indices, offsets, scale, mode, sparse, psw, last, pad)[0]
            if tpsw is not None:
                e = aten._embedding_bag.default(weight, indices, offsets, scale, mode, sparse, tpsw[c], last, pad)[0]
                d = e if d is None else d + e
            per_k.append(d)
        tout = torch.stack(per_k)
    return outs, (tout, None, None, None)


reg(aten._embedding_bag.default, _embedding_bag)
reg(aten._embedding_bag_forward_only.default, lambda p, t: _embedding_bag(p, t) if t[0] is not None or t[6] is not None
    else (call_op(aten._embedding_bag_forward_only.default, p), None))


def _scatter_with_reduce(p, t):
    """scatter(..., reduce='add'|'multiply') is scatter_reduce(..., 'sum'|'prod',
    include_self=True); a scalar value is a src without tangent. The op itself gives the
    primal, scatter_reduce's rule (or its fallback) the tangent."""
    from torch_fwd.engine import jvp_op
    x, dim, index, src, reduce = p
    y = call_op(aten.scatter.reduce if isinstance(src, torch.Tensor) else aten.scatter.value_reduce, p)
    if t[0] is None and (len(t) < 4 or t[3] is None):
        return y, None
    if not isinstance(src, torch.Tensor):
        src = torch.full(index.shape, src, dtype=x.dtype, device=x.device)
    how = {"add": "sum", "multiply": "prod"}[reduce]
    _, ty = jvp_op(aten.scatter_reduce.two, (x, dim, index, src, how, True), (t[0], None, None, t[3], None, None))
    return y, ty


reg(aten.scatter.reduce, _scatter_with_reduce)
reg(aten.scatter.value_reduce, _scatter_with_reduce)

def _segment_ids(lengths, n):
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths, output_size=n)


def _segment_reduce(p, t):
    """segment_reduce along ``axis`` with 1-D lengths or offsets: sum and mean are linear;
    max/min take the tangent of the winners (ties share it, as PyTorch's backward does);
    prod is the product rule, exact with zeros in a segment."""
    data, reduce, lengths, indices, offsets, axis, unsafe, initial = p
    y = call_op(aten.segment_reduce.default, p)
    if t[0] is None:
        return y, None
    if lengths is None:
        lengths = offsets[1:] - offsets[:-1] if offsets is not None and offsets.dim() == 1 else None
    if lengths is None or lengths.dim() != 1:
        raise NotImplementedError("torch_fwd: segment_reduce's rule takes 1-D lengths or offsets")
    axis = axis % data.dim()
    ta = axis + 1
    seg = _segment_ids(lengths, data.shape[axis])
    s = lengths.shape[0]

    def seg_sum(v):  # (K, ..., N, ...) -> (K, ..., S, ...)
        shape = list(v.shape)
        shape[ta] = s
        return v.new_zeros(shape).index_add(ta, seg, v)

    def per_element(v):  # (..., S, ...) -> (..., N, ...), each element its segment's value
        return v.index_select(axis, seg)
    tx = t[0]
    cnt = lengths.to(data.dtype).reshape((s,) + (1,) * (data.dim() - axis - 1))
    if reduce == "sum":
        return y, seg_sum(tx)
    if reduce == "mean":
        return y, seg_sum(tx) / cnt.clamp(min=1)
    if reduce in ("max", "min"):
        win = (data == per_element(y)).to(data.dtype)
        n_win = seg_sum(win.unsqueeze(0))[0]
        return y, seg_sum(tx * win) / n_win.clamp(min=1)
    if reduce == "prod":
        zero = data == 0
        nonzero_prod = aten.segment_reduce.default(torch.where(zero, torch.ones_like(data), data), "prod",
                                                   lengths=lengths, axis=axis, initial=1 if initial is None else initial)
        zeros_in = seg_sum(zero.to(data.dtype).unsqueeze(0))[0]
        others = torch.where(zero, per_element(nonzero_prod * (zeros_in == 1)),
                             per_element(nonzero_prod * (zeros_in == 0)) / torch.where(zero, torch.ones_like(data), data))
        return y, seg_sum(tx * others)
    raise NotImplementedError(f"torch_fwd: segment_reduce with reduce={reduce!r}")


reg(aten.segment_reduce.default, _segment_reduce)

TEST_CASES = [
    case("index_tensor", lambda x: x[torch.tensor([2, 0, 2])][:, :3] + x[:, torch.tensor([1, 3, 0])].T, lambda: (randn(3, 4),)),
    # boolean masks have data-dependent shapes: not capturable, the eager path runs
    case("index_bool", lambda x: x[x > 0].sum() + x[torch.tensor([True, False, True])].sum(), lambda: (randn(3, 4),),
         graph=False),
    case("index_select", lambda x: x.index_select(1, torch.tensor([3, 1])), lambda: (randn(3, 4),)),
    case("gather", lambda x: x.gather(1, torch.tensor([[0, 0], [3, 1], [2, 2]])), lambda: (randn(3, 4),)),
    case("scatter_src", lambda x, s: x.scatter(1, torch.tensor([[0, 2], [3, 1], [1, 2]]), s), lambda: (randn(3, 4), randn(3, 2))),
    case("scatter_value", lambda x: x.scatter(0, torch.tensor([[1, 0, 2, 1]]), 0.5), lambda: (randn(3, 4),)),
    case("scatter_add", lambda x, s: x.scatter_add(1, torch.tensor([[0, 0], [3, 1], [1, 1]]), s), lambda: (randn(3, 4), randn(3, 2))),
    case("index_add", lambda x, s: x.index_add(0, torch.tensor([2, 0]), s, alpha=2.0), lambda: (randn(3, 4), randn(2, 4))),
    case("index_put", lambda x, v: torch.index_put(x, (torch.tensor([0, 2]),), v), lambda: (randn(3, 4), randn(4))),
    case("index_put_acc", lambda x, v: x.index_put((torch.tensor([0, 0]), torch.tensor([1, 1])), v, accumulate=True),
         lambda: (randn(3, 4), randn(2))),
    case("setitem", lambda x, v: _setitem(x, v), lambda: (randn(3, 4), randn(4))),
    case("masked_fill", lambda x: x.masked_fill(x > 0.5, -1.0), lambda: (randn(3, 4),)),
    case("masked_fill_tensor", lambda x, v: x.masked_fill(x > 0, v), lambda: (randn(3, 4), randn())),
    case("embedding", lambda w: torch.nn.functional.embedding(torch.tensor([[1, 0], [2, 1]]), w), lambda: (randn(3, 5),)),
    case("scatter_reduce_add", lambda x, s: x.scatter(0, torch.tensor([[1, 0, 2, 1], [1, 1, 0, 2]]), s, reduce="add")
         + x.scatter(1, torch.tensor([[0, 0], [3, 1], [2, 2]]), 1.5, reduce="add"),
         lambda: (randn(3, 4), randn(2, 4)), check_torch_func=False),
    # scatter_reduce's prod fallback reads a value (.item()): the graph path refuses it
    case("scatter_reduce_multiply", lambda x, s: x.scatter(0, torch.tensor([[1, 0, 2, 1], [1, 1, 0, 2]]), s, reduce="multiply")
         + x.scatter(1, torch.tensor([[0, 0], [3, 1], [2, 2]]), 1.5, reduce="multiply"),
         lambda: (randn(3, 4), randn(2, 4)), check_torch_func=False, graph=False),
    case("embedding_bag_sum_weights", lambda w, psw: torch.nn.functional.embedding_bag(
        torch.tensor([1, 0, 2, 2, 1]), w, torch.tensor([0, 2, 2]), mode="sum", per_sample_weights=psw),
        lambda: (randn(3, 4), randn(5)), check_torch_func=False),
    case("embedding_bag_mean_max", lambda w: torch.nn.functional.embedding_bag(torch.tensor([[1, 0, 2], [2, 2, 1]]), w)
         + torch.nn.functional.embedding_bag(torch.tensor([[1, 0, 2], [2, 0, 1]]), w, mode="max"),
         lambda: (randn(3, 4),), check_torch_func=False),
    case("segment_reduce", lambda x: sum(torch.segment_reduce(x, r, lengths=torch.tensor([2, 0, 3, 1]), initial=0.5)
                                         for r in ("sum", "mean", "max", "min", "prod")),
         lambda: (randn(6, 3),), check_torch_func=False),
    case("segment_reduce_prod_zeros_offsets", lambda x: torch.segment_reduce(
        x * torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=x.dtype), "prod", offsets=torch.tensor([0, 3, 5, 6])),
        lambda: (randn(6),), check_torch_func=False),
]


def _setitem(x, v):
    y = x.clone()
    y[1] = v
    y[0, :2] = v[:2] * 2
    return y
