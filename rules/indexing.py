"""Indexing: index/gather/index_select (linear in the source), scatter/index_put/masked_fill
(linear jointly in the destination and the written values), embedding."""
import torch

from torch_fwd.combinators import linear, shift_dim
from torch_fwd.registry import library_rule as reg
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
]


def _setitem(x, v):
    y = x.clone()
    y[1] = v
    y[0, :2] = v[:2] * 2
    return y
