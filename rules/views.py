"""Views and shape ops. All are linear: the tangent gets the same op with its dims
shifted past the chunk dimension. View rules return real views of the tangent, which the
eager path relies on for in-place writes through views."""
import torch

from torch_fwd.combinators import linear, linear_vmap, shift_dim, shift_dims
from torch_fwd.engine import for_autograd
from torch_fwd.registry import call_op, library_rule as reg
from torch_fwd.tangent import align, materialize, restride_through_storage

from ._cases import case, randn

aten = torch.ops.aten


def _k(t):
    return t.shape[0]


def _view(t, x, size):
    return t.reshape((_k(t),) + tuple(size))


for _op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
    reg(_op, linear(_op, _view))
reg(aten.permute.default, linear(aten.permute.default, lambda t, x, dims: t.permute([0] + shift_dims(dims, x.dim()))))
reg(aten.transpose.int, linear(aten.transpose.int, lambda t, x, a, b: t.transpose(shift_dim(a, x.dim()), shift_dim(b, x.dim()))))
reg(aten.t.default, linear(aten.t.default, lambda t, x: t.transpose(1, 2) if x.dim() == 2 else t))
reg(aten.expand.default, linear(aten.expand.default, lambda t, x, size, implicit=False:
                                align(t, len(size)).expand((_k(t),) + tuple(size))))
reg(aten.slice.Tensor, linear(aten.slice.Tensor, lambda t, x, dim=0, start=None, end=None, step=1:
                              aten.slice.Tensor(t, shift_dim(dim, x.dim()), start, end, step)))
reg(aten.select.int, linear(aten.select.int, lambda t, x, dim, index: t.select(shift_dim(dim, x.dim()), index)))
reg(aten.narrow.default, linear(aten.narrow.default, lambda t, x, dim, start, length: t.narrow(shift_dim(dim, x.dim()), start, length)))
reg(aten.unsqueeze.default, linear(aten.unsqueeze.default, lambda t, x, dim: t.unsqueeze(dim % (x.dim() + 1) + 1)))
reg(aten.squeeze.default, linear(aten.squeeze.default, lambda t, x: t.reshape((_k(t),) + tuple(s for s in x.shape if s != 1))))
reg(aten.squeeze.dim, linear(aten.squeeze.dim, lambda t, x, dim: t.squeeze(shift_dim(dim, x.dim())) if x.dim() else t))
reg(aten.squeeze.dims, linear(aten.squeeze.dims, lambda t, x, dims: t.squeeze(tuple(shift_dims(dims, x.dim()))) if x.dim() else t))
for _op in (aten.alias.default, aten.lift_fresh.default):
    reg(_op, linear(_op, lambda t, x: t))
reg(aten.clone.default, linear(aten.clone.default, lambda t, x, memory_format=None: t.clone()))
reg(aten.flip.default, linear(aten.flip.default, lambda t, x, dims: t.flip(shift_dims(dims, x.dim()))))
reg(aten.roll.default, linear(aten.roll.default, lambda t, x, shifts, dims=():
                              t.roll(shifts, shift_dims(dims, x.dim())) if len(dims)
                              else t.reshape(_k(t), -1).roll(shifts, 1).reshape(t.shape)))
reg(aten.triu.default, linear(aten.triu.default, lambda t, x, diagonal=0: t.triu(diagonal)))
reg(aten.tril.default, linear(aten.tril.default, lambda t, x, diagonal=0: t.tril(diagonal)))
reg(aten.repeat.default, linear(aten.repeat.default, lambda t, x, repeats: align(t, len(repeats)).repeat([1] + list(repeats))))
reg(aten.constant_pad_nd.default, linear(aten.constant_pad_nd.default, lambda t, x, pad, value=0:
                                         aten.constant_pad_nd.default(t, pad, 0.0), homogeneous=False))
reg(aten.unfold.default, linear(aten.unfold.default, lambda t, x, dim, size, step: t.unfold(shift_dim(dim, x.dim()), size, step)))
reg(aten.diagonal.default, linear(aten.diagonal.default, lambda t, x, offset=0, dim1=0, dim2=1:
                                  t.diagonal(offset, shift_dim(dim1, x.dim()), shift_dim(dim2, x.dim()))))
reg(aten.diag_embed.default, linear(aten.diag_embed.default, lambda t, x, offset=0, dim1=-2, dim2=-1:
                                    torch.diag_embed(t, offset, dim1 if dim1 < 0 else dim1 + 1, dim2 if dim2 < 0 else dim2 + 1)))
reg(aten.movedim.int, linear(aten.movedim.int, lambda t, x, a, b: t.movedim(shift_dim(a, x.dim()), shift_dim(b, x.dim()))))
def _as_strided(p, t):
    """as_strided addresses the primal's *storage*. When the tangent mirrors that storage
    direction by direction (a view of a tangent laid out like its base), stride the
    tangent's own storage: elements outside the view then count, as they do for the primal.
    Otherwise lay the tangent out in a buffer shaped like the storage, zeros elsewhere."""
    x, size, stride, offset = p
    y = call_op(aten.as_strided.default, p)
    if t[0] is None:
        return y, None
    tx = t[0]
    k = tx.shape[0]
    n = x.untyped_storage().nbytes() // x.element_size()
    off = x.storage_offset() if offset is None else offset
    if tuple(tx.stride()[1:]) == tuple(x.stride()) and tx.stride(0) >= n and \
            tx.storage_offset() == x.storage_offset() and tx.untyped_storage().nbytes() >= k * n * tx.element_size():
        return y, tx.as_strided((k,) + tuple(size), (tx.stride(0),) + tuple(stride), off)
    return y, restride_through_storage(tx, x, size, stride, off)


reg(aten.as_strided.default, _as_strided)
for _op in (aten.diag.default, aten.pixel_shuffle.default, aten.pixel_unshuffle.default,
            aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.replication_pad1d.default,
            aten.replication_pad2d.default, aten._reshape_alias.default):
    reg(_op, linear_vmap(_op))


reg(aten.view_as_real.default, linear(aten.view_as_real.default, lambda t, x: torch.view_as_real(t)))
reg(aten.view_as_complex.default, linear(aten.view_as_complex.default, lambda t, x: torch.view_as_complex(t)))
reg(aten._conj.default, linear(aten._conj.default, lambda t, x: t._conj()))
reg(aten._neg_view.default, linear(aten._neg_view.default, lambda t, x: t._neg_view()))


def _to_copy(p, t):
    y = call_op(aten._to_copy.default, p)
    if t[0] is None or not (y.is_floating_point() or y.is_complex()):
        return y, None
    return y, t[0].to(dtype=y.dtype, device=y.device)


reg(aten._to_copy.default, _to_copy)


def _split_like(op):
    def rule(p, t):
        ys = call_op(op, p)
        if t[0] is None:
            return ys, None
        x, dim = p[0], p[2] if op is not aten.unbind.int else p[1]
        q = list(p)
        q[0] = t[0]
        q[2 if op is not aten.unbind.int else 1] = shift_dim(dim, x.dim())
        return ys, call_op(op, q)
    return rule


for _op in (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default,
            aten.tensor_split.sections, aten.tensor_split.indices):
    reg(_op, _split_like(_op))


def _joined(op, tangent_dim):
    """cat/stack: linear in every piece; inactive pieces get explicit zeros in the tangent."""
    def rule(p, t):
        tensors, dim = p
        y = op(tensors, dim)
        if t[0] is None:
            return y, None
        k = next(x for x in t[0] if x is not None).shape[0]
        # legacy cat skips 1-D empty tensors; so do the tangents
        parts = [materialize(tt, x, k) for x, tt in zip(tensors, t[0])
                 if not (op is aten.cat.default and x.dim() == 1 and x.numel() == 0)]
        return y, op(parts, tangent_dim(dim, y.dim()))
    return rule


reg(aten.cat.default, _joined(aten.cat.default, shift_dim))
reg(aten.stack.default, _joined(aten.stack.default, lambda dim, nd: dim % nd + 1))


def _copy(p, t):
    x, src = p[0], p[1]
    # (aten.copy has no derivative in autograd; an in-place copy into a tensor laid out
    # like x is the same value, and autograd differentiates it)
    y = torch.empty_like(x).copy_(src, p[2]) if for_autograd() else aten.copy.default(x, src, p[2])
    if t[1] is None:
        return y, None
    return y, align(t[1], x.dim()).expand((t[1].shape[0],) + tuple(x.shape)).to(x.dtype)


reg(aten.copy.default, _copy)


def _fill_tensor(p, t):
    y = aten.fill.Tensor(p[0], p[1])
    if t[1] is None:
        return y, None
    return y, t[1].reshape((t[1].shape[0],) + (1,) * p[0].dim()).expand((t[1].shape[0],) + tuple(p[0].shape)).to(y.dtype)


reg(aten.fill.Tensor, _fill_tensor)

TEST_CASES = [
    case("view_permute", lambda x: x.view(4, 3).permute(1, 0).reshape(-1) * 2, lambda: (randn(3, 4),)),
    case("transpose_t", lambda x: x.transpose(0, 1).t() + x.mT.T, lambda: (randn(3, 4),)),
    case("expand", lambda x: x.expand(2, 3, 4) + 1, lambda: (randn(3, 1),)),
    case("slice_select", lambda x: x[1:, ::2] * x[0, 1] + x[..., -1:].sum(), lambda: (randn(3, 4),)),
    case("squeeze_unsqueeze", lambda x: x.unsqueeze(0).unsqueeze(-1).squeeze(0).squeeze() + x.squeeze(1).unsqueeze(1),
         lambda: (randn(3, 1),)),
    case("flatten", lambda x: torch.flatten(x, 1), lambda: (randn(2, 3, 4),)),
    case("cat_stack", lambda a, b: torch.cat([a, b * 2], 1).sum(1) + torch.stack([a, b], -1).sum((1, 2)),
         lambda: (randn(3, 4), randn(3, 4))),
    case("cat_one_active", lambda a: torch.cat([a, torch.ones(3, 2, dtype=a.dtype)], 1), lambda: (randn(3, 4),)),
    case("split", lambda x: sum(s.sum(0) for s in torch.split(x, [1, 3], dim=1)), lambda: (randn(3, 4),)),
    case("chunk_unbind", lambda x: x.chunk(2, 0)[1] + torch.unbind(x, 0)[0], lambda: (randn(4, 3),)),
    case("tensor_split", lambda x: torch.tensor_split(x, 3, dim=1)[2], lambda: (randn(2, 7),)),
    case("flip_roll", lambda x: x.flip(0) + x.roll(1, 1) + x.roll(2), lambda: (randn(3, 4),)),
    case("triu_tril", lambda x: x.triu(1) + x.tril(-1) * 3, lambda: (randn(4, 4),)),
    case("repeat_pad", lambda x: torch.nn.functional.pad(x.repeat(2, 1, 1), (1, 2)), lambda: (randn(3, 4),)),
    case("kron", torch.kron, lambda: (randn(2, 3), randn(3, 2))),
    case("diagonal", lambda x: x.diagonal(1) + torch.diag(x)[:3], lambda: (randn(4, 4),)),
    case("diag_embed", lambda x: torch.diag_embed(x), lambda: (randn(2, 3),)),
    case("movedim", lambda x: x.movedim(0, -1), lambda: (randn(2, 3, 4),)),
    case("unfold", lambda x: x.unfold(1, 2, 1), lambda: (randn(2, 5),)),
    case("to_dtype", lambda x: x.float().double() * 2, lambda: (randn(3),), atol=1e-3, rtol=1e-3),
    case("as_strided", lambda x: x.as_strided((2, 2), (1, 2)), lambda: (randn(6),)),
    case("as_strided_of_a_view", lambda x: x[2:].as_strided((2, 2), (1, 2), 1), lambda: (randn(6),)),
    case("clone_contig", lambda x: x.t().contiguous().clone(), lambda: (randn(3, 4),)),
]
