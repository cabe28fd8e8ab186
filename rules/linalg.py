"""Matmul family (bilinear) and dense linear algebra.

``matmul``, ``linear`` and ``einsum`` decompose (CompositeImplicitAutograd) into the ops
below before either path sees them, so their rules are these. A product against an
inactive operand's (zero) tangent is never formed: that is the activity analysis at work.
"""
import torch

from torch_fwd.compat import aten_op
from torch_fwd.engine import for_autograd, jvp_op, without_rule
from torch_fwd.registry import call_op, library_rule as reg
from torch_fwd.tangent import align, tadd

from ._cases import case, randn

aten = torch.ops.aten


def _left(a, tb):
    """a @ tb for a chunked tb (K, ..., n, p), as one matmul against a folded operand."""
    return torch.matmul(tb.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)


def product_tangent(a, b, ta, tb):
    """dA B + A dB of ``a @ b`` (None for a zero tangent), tangents with a leading K: the
    rule of every product (mm, bmm, addmm, baddbmm, and attention's scores and output)."""
    t = ta if ta is not None else tb
    if t is None:
        return None
    if t.shape[0] == 1:
        # K = 1: products of the tangents without their K dimension. For matrices, the second
        # accumulated into the first -- five ops where the chunked form below is up to fifteen
        # once matmul decomposes, each a Python call in the graph path; for any rank, the
        # products share their operands' contiguous copies with the primal's (CSE) where the
        # broadcast (K, ...) form copies each operand again (the transformer block's JVP
        # graph: 7 copies instead of 9)
        if a.dim() == b.dim() and a.dim() in (2, 3):
            prod, acc = (aten.mm.default, aten.addmm.default) if a.dim() == 2 else (aten.bmm.default, aten.baddbmm.default)
            out = None if ta is None else prod(ta[0], b)
            if tb is not None:
                out = prod(a, tb[0]) if out is None else acc(out, a, tb[0])
        else:
            out = None if ta is None else ta[0] @ b
            if tb is not None:
                out = tadd(out, a @ tb[0])
        return out.unsqueeze(0)
    out = None
    if ta is not None:
        out = torch.matmul(ta, b)
    if tb is not None:
        out = tadd(out, _left(a, tb))
    return out


def _mm(p, t):
    a, b = p
    return aten.mm.default(a, b), product_tangent(a, b, t[0], t[1])


def _bmm(p, t):
    a, b = p
    return aten.bmm.default(a, b), product_tangent(a, b, t[0], t[1])


def _scaled(t, s):
    return None if t is None else (t if s == 1 else t * s)


def _addmm(op):
    def rule(p, t):
        bias, a, b, beta, alpha = p
        y = call_op(op, p)
        return y, tadd(_scaled(t[0], beta), _scaled(product_tangent(a, b, t[1], t[2]), alpha))
    return rule


reg(aten.mm.default, _mm)
reg(aten.bmm.default, _bmm)
reg(aten.addmm.default, _addmm(aten.addmm.default))
reg(aten.baddbmm.default, _addmm(aten.baddbmm.default))
reg(aten.dot.default, lambda p, t: (aten.dot.default(*p), tadd(None if t[0] is None else (t[0] * p[1]).sum(-1),
                                                             None if t[1] is None else (p[0] * t[1]).sum(-1))))
reg(aten.mv.default, lambda p, t: (aten.mv.default(*p), tadd(None if t[0] is None else torch.matmul(t[0], p[1]),
                                                           None if t[1] is None else torch.matmul(t[1], p[0].T))))
reg(aten.outer.default, lambda p, t: (aten.outer.default(*p), tadd(
    None if t[0] is None else t[0].unsqueeze(-1) * p[1], None if t[1] is None else p[0].unsqueeze(-1) * t[1].unsqueeze(-2))))


def _sym_tri(x, upper):
    """The part of a triangular matrix's tangent the op reads."""
    return x.triu() if upper else x.tril()


def _cholesky_tangent(L, tA, upper):
    """The tangent of the factor L the op returned (upper: U = L^T), from tA.

    dL = L Phi(L^-1 S L^-T) for the lower factor, Phi: lower triangle with the diagonal
    halved, S the triangle of tA the op reads, mirrored (what finite differences measure
    along a non-symmetric direction). S is never formed: with S = T + T^T, T that triangle
    with its diagonal halved, L^-1 S L^-T = Y + Y^T for Y = L^-1 T L^-T, and
    Phi(Y + Y^T) = tril(Y) + triu(Y, 1)^T. A mirror of tA would be a transposed read of a
    tangent computed just before it, which Inductor writes out in a kernel of its own
    (gp_lml's compiled JVP: 5 C++ kernels instead of 4); Y comes out of a solve, written
    out anyway, and its transposed read joins Phi's kernel."""
    low = L.mT if upper else L
    # (the diagonal halved by a product with a constant: a read of tA's diagonal would
    # be a read at another index, and Inductor would write tA out first to serve it)
    halve_diagonal = 1 - 0.5 * torch.eye(tA.shape[-1], dtype=tA.dtype, device=tA.device)
    T = _sym_tri(tA, upper) * halve_diagonal
    Y = torch.linalg.solve_triangular(low, T.mT if upper else T, upper=False)
    Y = torch.linalg.solve_triangular(low.mT, Y, upper=True, left=False)
    dL = low @ (Y.tril() + Y.triu(1).mT)
    return dL.mT if upper else dL


def _cholesky_ex(p, t):
    A, upper, check = p
    L, info = call_op(aten.linalg_cholesky_ex.default, p)
    if t[0] is None:
        return (L, info), None
    return (L, info), (_cholesky_tangent(L, t[0], upper), None)


def _cholesky(p, t):
    A, upper = p
    L = _CHOLESKY(A, upper)
    return L, None if t[0] is None else _cholesky_tangent(L, t[0], upper)


reg(aten.linalg_cholesky_ex.default, _cholesky_ex)
_CHOLESKY = aten_op("cholesky")  # (gone in torch 2.14 with torch.cholesky)
if _CHOLESKY is not None:
    reg(_CHOLESKY, _cholesky)
_legacy_cholesky = torch.cholesky if _CHOLESKY is not None else torch.linalg.cholesky


def _solve_triangular(p, t):
    A, B, upper, left, unitriangular = p
    X = aten.linalg_solve_triangular.default(A, B, upper=upper, left=left, unitriangular=unitriangular)
    tA, tB = t[0], t[1]
    if tA is None and tB is None:
        return X, None
    # (tangents viewed with X's rank after K: a batch dimension only B or only A has stays
    # where the op broadcast it, never against K)
    rhs = align(tB, X.dim())
    if tA is not None:
        tA = align(_sym_tri(tA, upper), X.dim())
        if unitriangular:
            tA = tA - torch.diag_embed(tA.diagonal(dim1=-2, dim2=-1))
        rhs = tadd(rhs, -(tA @ X) if left else -(X @ tA))
    return X, torch.linalg.solve_triangular(A, rhs, upper=upper, left=left, unitriangular=unitriangular)


reg(aten.linalg_solve_triangular.default, _solve_triangular)


def _cholesky_solve(p, t):
    B, L, upper = p
    X = aten.cholesky_solve.default(B, L, upper)
    tB, tL = t[0], t[1]
    if tB is None and tL is None:
        return X, None
    # (tangents viewed with X's rank after K, as in _solve_triangular)
    rhs = align(tB, X.dim())
    # the op reads one triangle of L; so does its tangent (PyTorch's own backward of
    # cholesky_solve spreads gradient over the whole of L: the tril keeps autograd exact)
    L = _sym_tri(L, upper)
    if tL is not None:
        Xt = aten.cholesky_solve.default(B, L, upper) if for_autograd() else X
        tL = align(_sym_tri(tL, upper), X.dim())
        # A = L L^T (or U^T U); dA = dL L^T + L dL^T. dA X as products with X's columns,
        # never forming dA: two matrix-vector products for a vector right-hand side where
        # dA would cost two n^3 matmuls
        if upper:
            dAX = _matvec(tL.mT, _matvec(L, Xt)) + _matvec(L.mT, _matvec(tL, Xt))
        else:
            dAX = _matvec(tL, _matvec(L.mT, Xt)) + _matvec(L, _matvec(tL.mT, Xt))
        rhs = tadd(rhs, -dAX)
    k = rhs.shape[0]
    return X, _solve_each_direction(rhs.expand((k,) + X.shape), L.expand(X.shape[:-2] + L.shape[-2:]), upper)


def _matvec(a, b):
    """a @ b; with a vector right-hand side and no batch, as a bmm of one. Inductor lowers
    a bmm against a vector on the CPU to a multiply and a sum it fuses with its neighbours,
    an mm to a BLAS call (kernel/bmm.py, tuned_bmm): gp_lml's four products of the
    cholesky_solve tangent then share one C++ kernel (its JVP: 6 kernels to compile -> 5).
    The eager and graph paths pay nothing for it (the same BLAS product)."""
    if b.shape[-1] != 1 or a.shape[:-2].numel() != 1 or b.shape[:-2].numel() != 1:
        return a @ b
    return torch.bmm(a.reshape((1,) + a.shape[-2:]), b.reshape((1,) + b.shape[-2:])).reshape(
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], 1))


def _solve_each_direction(rhs, L, upper):
    """cholesky_solve of K right-hand sides (K, ..., n, m) with one factor (..., n, n) of
    the same batch: the K directions become K x m columns of one solve. One LAPACK call,
    and no copy of the factor expanded to K (for K = 64, n = 128 and a vector right-hand
    side, 125 us against 970 us for K batched solves)."""
    cols = rhs.movedim(0, -1)  # (..., n, m, K)
    # (the m x K columns counted, not -1: with n = 0 the reshape could not infer them)
    out = torch.cholesky_solve(cols.reshape(cols.shape[:-2] + (cols.shape[-2] * cols.shape[-1],)), L, upper)
    return out.reshape(cols.shape).movedim(-1, 0)


reg(aten.cholesky_solve.default, _cholesky_solve)


def _is_vector_rhs(A, B):
    return B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])


def _lu_factor_ex(p, t):
    """Square A = P L U, packed as LU: with X = L^-1 P^T dA U^-1, dL = L strictly_lower(X)
    and dU = upper(X) U."""
    A, pivot, check = p
    LU, pivots, info = call_op(aten.linalg_lu_factor_ex.default, p)
    if t[0] is None:
        return (LU, pivots, info), None
    if A.shape[-1] != A.shape[-2] or not pivot:
        return without_rule(aten.linalg_lu_factor_ex.default, p, t)  # rectangular or unpivoted
    P, L, U = torch.lu_unpack(LU, pivots)
    X = torch.linalg.solve_triangular(L, P.mT @ t[0], upper=False, unitriangular=True)
    X = torch.linalg.solve_triangular(U, X, upper=True, left=False)
    tLU = L @ X.tril(-1) + X.triu() @ U
    return (LU, pivots, info), (tLU, None, None)


reg(aten.linalg_lu_factor_ex.default, _lu_factor_ex)


def _linalg_solve_ex(p, t):
    A, B, left, check = p
    tA, tB = t[0], t[1]
    if tA is None and tB is None:
        return aten._linalg_solve_ex.default(A, B, left=left, check_errors=check), None
    # solve = lu_factor_ex + lu_solve, as PyTorch computes it, spelled out: the tangent's
    # lu_solve reuses the factorisation through ops that autograd and an enclosing jvp can
    # differentiate (autograd treats the LU output of _linalg_solve_ex as a constant)
    (LU, pivots, info), tf = jvp_op(aten.linalg_lu_factor_ex.default, (A, True, check), (tA, None, None))
    vec = _is_vector_rhs(A, B)
    Bm = B.unsqueeze(-1) if vec else B
    Xm = torch.linalg.lu_solve(LU, pivots, Bm, left=left)
    # (tangents viewed with Xm's rank after K, as in _solve_triangular)
    rhs = None if tB is None else align(tB.unsqueeze(-1) if vec else tB, Xm.dim())
    if tA is not None:
        tA = align(tA, Xm.dim())
        rhs = tadd(rhs, -(tA @ Xm) if left else -(Xm @ tA))
    tX = torch.linalg.lu_solve(LU, pivots, rhs, left=left)
    X = Xm.squeeze(-1) if vec else Xm
    return (X, LU, pivots, info), (tX.squeeze(-1) if vec else tX, None if tf is None else tf[0], None, None)


reg(aten._linalg_solve_ex.default, _linalg_solve_ex)


def _inv_ex(p, t):
    A, check = p
    Ainv, info = aten.linalg_inv_ex.default(A, check_errors=check)
    if t[0] is None:
        return (Ainv, info), None
    return (Ainv, info), (-(Ainv @ t[0] @ Ainv), None)


reg(aten.linalg_inv_ex.default, _inv_ex)


def _trace_solve(A, tA):
    """trace(A^-1 dA). (The LU that _linalg_det returns may be of A^T, so solve afresh.)"""
    return torch.linalg.solve(A, tA).diagonal(dim1=-2, dim2=-1).sum(-1)


def _slogdet(p, t):
    A = p[0]
    sign, logabs, LU, pivots = aten._linalg_slogdet.default(A)
    outs = (sign, logabs, LU, pivots)
    if t[0] is None:
        return outs, None
    if A.is_complex():
        return _fallback_complex("slogdet")
    return outs, (None, _trace_solve(A, t[0]), _unknown(LU, t[0]), None)


def _det(p, t):
    A = p[0]
    det, LU, pivots = aten._linalg_det.default(A)
    if t[0] is None:
        return (det, LU, pivots), None
    return (det, LU, pivots), (det * _trace_solve(A, t[0]), _unknown(LU, t[0]), None)


def _unknown(LU, tA):
    """The tangent of det's and slogdet's LU output (of A or of A^T, PyTorch does not say
    which): not computed, and NaN so that any use shows instead of a silent zero."""
    return torch.full((tA.shape[0],) + tuple(LU.shape), float("nan"), dtype=LU.dtype, device=LU.device)


def _fallback_complex(name):
    raise NotImplementedError(f"torch_fwd: complex {name} has no rule yet")


reg(aten._linalg_slogdet.default, _slogdet)
reg(aten._linalg_det.default, _det)


def _spd(n, batch=()):
    a = randn(*batch, n, n)
    return a @ a.mT + n * torch.eye(n, dtype=a.dtype)


def _tri(n, upper=False):
    a = randn(n, n)
    a = a.triu() if upper else a.tril()
    return a + 3 * torch.eye(n, dtype=a.dtype)


TEST_CASES = [
    case("mm", torch.mm, lambda: (randn(3, 4), randn(4, 2))),
    case("bmm", torch.bmm, lambda: (randn(2, 3, 4), randn(2, 4, 5))),
    # one operand active: each product of the K = 1 shortcut and of the chunked form alone
    case("mm_left_only", torch.mm, lambda: (randn(3, 4), randn(4, 2)), argnums=(0,)),
    case("mm_right_only", torch.mm, lambda: (randn(3, 4), randn(4, 2)), argnums=(1,)),
    case("bmm_right_only", torch.bmm, lambda: (randn(2, 3, 4), randn(2, 4, 5)), argnums=(1,)),
    case("addmm_bias_and_right", lambda c, a, b: torch.addmm(c, a, b, alpha=3.0), lambda: (randn(3, 2), randn(3, 4), randn(4, 2)),
         argnums=(0, 2)),
    case("addmm", lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0), lambda: (randn(2), randn(3, 4), randn(4, 2))),
    case("baddbmm", lambda c, a, b: torch.baddbmm(c, a, b, alpha=0.5), lambda: (randn(2, 3, 5), randn(2, 3, 4), randn(2, 4, 5))),
    case("matmul_nd", torch.matmul, lambda: (randn(2, 3, 4), randn(4, 5))),
    case("matmul_vec", lambda a, b: a @ b, lambda: (randn(4), randn(2, 4, 3))),
    case("matmul_batched", torch.matmul, lambda: (randn(2, 1, 3, 4), randn(3, 4, 2))),
    case("linear", torch.nn.functional.linear, lambda: (randn(5, 4), randn(3, 4), randn(3))),
    case("einsum", lambda a, b: torch.einsum("bij,bjk->bik", a, b) + torch.einsum("bii->bi", a).sum(), lambda: (randn(2, 3, 3), randn(2, 3, 2))),
    case("dot_mv_outer", lambda a, b: torch.dot(a, b) + torch.mv(torch.outer(a, b), a).sum(), lambda: (randn(4), randn(4))),
    case("cholesky", lambda a: torch.linalg.cholesky(a @ a.mT + 4 * torch.eye(4, dtype=a.dtype)), lambda: (randn(4, 4),)),
    case("cholesky_upper", lambda a: torch.linalg.cholesky(a @ a.mT + 4 * torch.eye(4, dtype=a.dtype), upper=True), lambda: (randn(4, 4),)),
    # (aten.cholesky's rule: torch.cholesky is gone from torch 2.14, with the op)
    case("cholesky_batched", lambda a: _legacy_cholesky(a @ a.mT + 4 * torch.eye(3, dtype=a.dtype)),
         lambda: (randn(2, 3, 3),)),
    # along a non-symmetric direction only the triangle the op reads counts; torch.func.jvp
    # takes the whole matrix, finite differences agree with us
    case("cholesky_nonsymmetric_direction", torch.linalg.cholesky, lambda: (_spd(4),), check_torch_func=False),
    case("cholesky_upper_nonsymmetric_direction", lambda a: torch.linalg.cholesky(a, upper=True), lambda: (_spd(4),),
         check_torch_func=False),
    case("solve_triangular", lambda a, b: torch.linalg.solve_triangular(a, b, upper=False), lambda: (_tri(4), randn(4, 2))),
    case("solve_triangular_batched_rhs_one_factor", lambda a, b: torch.linalg.solve_triangular(a, b, upper=False),
         lambda: (_tri(4), randn(2, 4, 3))),
    case("solve_triangular_batched_factor_one_rhs", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True),
         lambda: (torch.stack([_tri(4, upper=True), _tri(4, upper=True)]), randn(4, 3))),
    case("solve_triangular_right_upper", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True, left=False, unitriangular=True),
         lambda: (_tri(3, upper=True), randn(2, 3))),
    # cholesky_solve reads one triangle of its factor; torch.func.jvp differentiates the whole
    # matrix, so along a full tangent it is wrong (finite differences agree with us)
    case("cholesky_solve_reads_one_triangle", lambda b, l: torch.cholesky_solve(b, l),
         lambda: (randn(4, 2), torch.linalg.cholesky(_spd(4)) + torch.ones(4, 4, dtype=torch.float64).triu(1)),
         check_torch_func=False),
    case("cholesky_solve", lambda b, l: torch.cholesky_solve(b, l), lambda: (randn(4, 2), _tri(4)), check_torch_func=False),
    case("cholesky_solve_empty", lambda b, l: torch.cholesky_solve(b, l), lambda: (randn(0, 2), randn(0, 0))),
    case("cholesky_solve_batched_factor", lambda b, l: torch.cholesky_solve(b, l),
         lambda: (randn(2, 4, 3), torch.stack([_tri(4), _tri(4)])), check_torch_func=False),
    case("cholesky_solve_batched_rhs_one_factor", lambda b, l: torch.cholesky_solve(b, l),
         lambda: (randn(2, 4, 3), _tri(4)), check_torch_func=False),
    case("cholesky_solve_batched_factor_one_rhs", lambda b, l: torch.cholesky_solve(b, l),
         lambda: (randn(4, 3), torch.stack([_tri(4), _tri(4)])), check_torch_func=False),
    # a vector right-hand side: the tangent's products as bmms of one (_matvec), or with a batch as matmuls
    case("cholesky_solve_vector_rhs", lambda b, l: torch.cholesky_solve(b, l), lambda: (randn(4, 1), _tri(4)),
         check_torch_func=False),
    case("cholesky_solve_batched_factor_vector_rhs", lambda b, l: torch.cholesky_solve(b, l),
         lambda: (randn(2, 4, 1), torch.stack([_tri(4), _tri(4)])), check_torch_func=False),
    case("cholesky_solve_upper_vector_rhs", lambda b, u: torch.cholesky_solve(b, u, upper=True),
         lambda: (randn(4, 1), _tri(4, upper=True)), check_torch_func=False),
    case("cholesky_solve_upper", lambda b, u: torch.cholesky_solve(b, u, upper=True), lambda: (randn(4, 2), _tri(4, upper=True)),
         check_torch_func=False),
    case("lu_factor", lambda a: torch.linalg.lu_factor(a)[0], lambda: (randn(2, 4, 4),)),
    case("lu_factor_wide", lambda a: torch.linalg.lu_factor(a)[0], lambda: (randn(3, 5),)),
    case("solve_general", torch.linalg.solve, lambda: (randn(4, 4) + 4 * torch.eye(4, dtype=torch.float64), randn(4, 3))),
    case("solve", torch.linalg.solve, lambda: (_spd(4), randn(4, 3))),
    case("solve_batched_rhs_one_matrix", torch.linalg.solve, lambda: (_spd(4), randn(2, 4, 3))),
    case("solve_batched_matrix_one_rhs", torch.linalg.solve, lambda: (_spd(4, batch=(2,)), randn(4, 3))),
    case("solve_vec", torch.linalg.solve, lambda: (_spd(4), randn(4))),
    case("solve_batched_left_false", lambda a, b: torch.linalg.solve(a, b, left=False), lambda: (_spd(3, (2,)), randn(2, 4, 3))),
    case("inv", torch.linalg.inv, lambda: (_spd(4),)),
    case("slogdet", lambda a: torch.linalg.slogdet(a).logabsdet, lambda: (_spd(4),)),
    case("logdet", torch.logdet, lambda: (_spd(3, (2,)),)),
    case("det", torch.linalg.det, lambda: (randn(3, 3),)),
]
