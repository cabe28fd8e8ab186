"""Random ops and tensor factories that only read their input's metadata: the sample does
not move with the input's value, so the tangent is zero (dropout, which scales its input,
lives in nn.py)."""
import torch

from torch_fwd.combinators import zero
from torch_fwd.registry import call_op, library_rule as reg

from ._cases import case, randn

aten = torch.ops.aten

ZERO = [
    aten.bernoulli.default, aten.bernoulli.p, aten.bernoulli.Tensor, aten.rand_like.default, aten.randn_like.default,
    aten.randint_like.default, aten.randint_like.low_dtype, aten.multinomial.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
    aten.new_empty_strided.default, aten.empty_strided.default, aten._new_zeros_with_same_feature_meta.default,
    aten.detach.default,
    aten._local_scalar_dense.default, aten.nonzero.default, aten.bucketize.Tensor, aten.searchsorted.Tensor,
    aten.histc.default, aten.one_hot.default, aten.zero.default, aten.fill.Scalar,
    # the functional forms of x.exponential_() and friends: run as the op itself, since a
    # decomposition would draw different numbers than the caller's x.exponential_()
    aten.exponential.default, aten.geometric.default, aten.log_normal.default, aten.cauchy.default,
    aten.uniform.default, aten.random.default, getattr(aten.random, "from"), aten.random.to, aten.normal_functional.default,
]
for _op in ZERO:
    reg(_op, zero(_op))


def _normal_tt(p, t):
    mean, std = p[0], p[1]
    y = call_op(aten.normal.Tensor_Tensor, p)
    eps = (y - mean) / std
    out = None
    if t[0] is not None:
        out = t[0].expand((t[0].shape[0],) + tuple(y.shape))
    if t[1] is not None:
        ts = t[1] * eps
        out = ts if out is None else out + ts
    return y, out


reg(aten.normal.Tensor_Tensor, _normal_tt)

TEST_CASES = [
    case("like_factories", lambda x: torch.zeros_like(x) + torch.ones_like(x) * x + x.new_full((3, 4), 2.0) + torch.empty_like(x).fill_(1.0),
         lambda: (randn(3, 4),)),
    case("inplace_random_draws_as_the_op", lambda x: x * x.clone().exponential_() + x.clone().normal_() + x.clone().uniform_(),
         lambda: (randn(3, 4),)),
    case("bernoulli_mask", lambda x: x * torch.bernoulli(torch.full_like(x, 1.0)), lambda: (randn(3, 4),)),
    # .item()/.tolist() give Python numbers, which carry no tangent: used for control flow only.
    case("item_control_flow", lambda x: x * 2 if x.sum().item() > 0 else x.sin(), lambda: (randn(3, 4),), graph=False),
    case("tolist_loop", lambda x: sum(x[i].sin() for i, v in enumerate(x.tolist()) if v > 0) + x.sum(), lambda: (randn(5),),
         graph=False),
]
