"""Special functions: Bessel functions and orthogonal polynomials, by their classical
derivative identities (DLMF 10.6, 10.29, 18.9). PyTorch has no forward formula for
these and marks them non-differentiable, so torch.func.jvp returns a silent zero tangent.

The polynomials take the degree ``n`` as a tensor or a number; PyTorch truncates it to
an integer, so the derivative in ``n`` is zero. Where an identity divides by zero (x = 0
for J1, I1, Laguerre; x = +-1 for U and Legendre) the limit is substituted, with the
denominator made safe so that the unused branch carries no NaN into second derivatives.
"""
import torch

from torch_fwd.combinators import elementwise, unary, zero
from torch_fwd.registry import library_rule as reg

from ._cases import case, rand, randn

aten = torch.ops.aten
S = torch.special


def _safe(d, bad):
    return torch.where(bad, torch.ones_like(d), d)


def _over_x(num, x, at_zero):
    """num / x, with its limit ``at_zero`` at x = 0."""
    zero = x == 0
    return torch.where(zero, torch.full_like(num, at_zero), num / _safe(x, zero))


BESSEL = {
    aten.special_bessel_j0.default: lambda x, y: -S.bessel_j1(x),
    aten.special_bessel_j1.default: lambda x, y: S.bessel_j0(x) - _over_x(y, x, 0.5),
    aten.special_bessel_y0.default: lambda x, y: -S.bessel_y1(x),
    aten.special_bessel_y1.default: lambda x, y: S.bessel_y0(x) - y / x,
    aten.special_modified_bessel_i0.default: lambda x, y: S.modified_bessel_i1(x),
    aten.special_modified_bessel_i1.default: lambda x, y: S.modified_bessel_i0(x) - _over_x(y, x, 0.5),
    aten.special_modified_bessel_k0.default: lambda x, y: -S.modified_bessel_k1(x),
    aten.special_modified_bessel_k1.default: lambda x, y: -S.modified_bessel_k0(x) - y / x,
    # exp(x) K_nu(x): the product rule on top of K_nu's identity
    aten.special_scaled_modified_bessel_k0.default: lambda x, y: y - S.scaled_modified_bessel_k1(x),
    aten.special_scaled_modified_bessel_k1.default: lambda x, y: y - S.scaled_modified_bessel_k0(x) - y / x,
    # sin(x) / x
    aten.special_spherical_bessel_j0.default: lambda x, y: _over_x(torch.cos(x) - y, x, 0.0),
}
for _op, _d in BESSEL.items():
    reg(_op, unary(_op, _d))


def _deg(n, x):
    """The degree as PyTorch uses it (truncated), as a tensor like x."""
    return torch.trunc(n) if isinstance(n, torch.Tensor) else x.new_full((), float(int(n)))


def _cheb_u_deriv(x, n):
    """U_n'(x) = ((n + 1) T_{n+1} - x U_n) / (x^2 - 1); at x = +-1, (+-1)^(n+1) n(n+1)(n+2)/3."""
    n = _deg(n, x)
    den = x * x - 1
    edge = den == 0
    inner = ((n + 1) * S.chebyshev_polynomial_t(x, n + 1) - x * S.chebyshev_polynomial_u(x, n)) / _safe(den, edge)
    limit = torch.where(x > 0, torch.ones_like(x), (-1.0) ** (n + 1)) * n * (n + 1) * (n + 2) / 3
    return torch.where(n < 0, torch.zeros_like(x), torch.where(edge, limit, inner))


def _legendre_deriv(x, n):
    """P_n'(x) = n (x P_n - P_{n-1}) / (x^2 - 1); at x = +-1, (+-1)^(n+1) n(n+1)/2."""
    n = _deg(n, x)
    den = x * x - 1
    edge = den == 0
    inner = n * (x * S.legendre_polynomial_p(x, n) - S.legendre_polynomial_p(x, n - 1)) / _safe(den, edge)
    limit = torch.where(x > 0, torch.ones_like(x), (-1.0) ** (n + 1)) * n * (n + 1) / 2
    return torch.where(n < 0, torch.zeros_like(x), torch.where(edge, limit, inner))


def _laguerre_deriv(x, n):
    """L_n'(x) = n (L_n - L_{n-1}) / x; at x = 0, -n."""
    n = _deg(n, x)
    zero = x == 0
    inner = n * (S.laguerre_polynomial_l(x, n) - S.laguerre_polynomial_l(x, n - 1)) / _safe(x, zero)
    return torch.where(n < 0, torch.zeros_like(x), torch.where(zero, -n * torch.ones_like(x), inner))


def _shifted(deriv):
    """P*_n(x) = P_n(2x - 1)."""
    return lambda x, n: 2 * deriv(2 * x - 1, n)


def _u(x, n):
    return S.chebyshev_polynomial_u(x, n)


POLYNOMIAL_DERIVS = {
    "chebyshev_polynomial_t": lambda x, n: _deg(n, x) * _u(x, _deg(n, x) - 1) * (_deg(n, x) > 0),
    "chebyshev_polynomial_u": _cheb_u_deriv,
    # V_n = U_n - U_{n-1}, W_n = U_n + U_{n-1}
    "chebyshev_polynomial_v": lambda x, n: _cheb_u_deriv(x, n) - _cheb_u_deriv(x, _deg(n, x) - 1),
    "chebyshev_polynomial_w": lambda x, n: _cheb_u_deriv(x, n) + _cheb_u_deriv(x, _deg(n, x) - 1),
    "hermite_polynomial_h": lambda x, n: 2 * _deg(n, x) * S.hermite_polynomial_h(x, _deg(n, x) - 1) * (_deg(n, x) > 0),
    "hermite_polynomial_he": lambda x, n: _deg(n, x) * S.hermite_polynomial_he(x, _deg(n, x) - 1) * (_deg(n, x) > 0),
    "laguerre_polynomial_l": _laguerre_deriv,
    "legendre_polynomial_p": _legendre_deriv,
}
for _kind in ("t", "u", "v", "w"):
    POLYNOMIAL_DERIVS[f"shifted_chebyshev_polynomial_{_kind}"] = _shifted(POLYNOMIAL_DERIVS[f"chebyshev_polynomial_{_kind}"])

for _name, _d in POLYNOMIAL_DERIVS.items():
    _packet = getattr(aten, f"special_{_name}")
    # (x, n) tensors, or a number for one of them: d/dn = 0; a number x has no tangent
    reg(_packet.default, elementwise(_packet.default, lambda x, n, y, _d=_d: _d(x, n), None))
    reg(_packet.n_scalar, elementwise(_packet.n_scalar, lambda x, n, y, _d=_d: _d(x, n), None))
    reg(_packet.x_scalar, zero(_packet.x_scalar))  # a number x, a degree tensor: piecewise constant


# ---- incomplete gamma and Hurwitz zeta -------------------------------------------------------

_SERIES_TERMS = 256   # the series for dP/da converges for a up to ~1000 (terms ~ exp(-k^2 / 2a))
_LAGUERRE_NODES = 64


def _gauss_laguerre(n, dtype, device):
    """Nodes and weights of n-point Gauss-Laguerre quadrature (Golub-Welsch: eigen-
    decomposition of the Jacobi matrix of the Laguerre recurrence)."""
    i = torch.arange(n, dtype=torch.float64)
    jacobi = torch.diag(2 * i + 1) + torch.diag(i[1:], 1) + torch.diag(i[1:], -1)
    nodes, vecs = torch.linalg.eigh(jacobi)
    return nodes.to(dtype=dtype, device=device), (vecs[0] ** 2).to(dtype=dtype, device=device)


def _igamma_da(a, x, p_val):
    """d/da of the regularised lower incomplete gamma P(a, x).

    For x <= a + 1, the series P = sum_k exp((a + k) log x - x - lgamma(a + k + 1)) term by
    term: d/da = sum_k term_k (log x - digamma(a + k + 1)). Beyond, through Q = 1 - P and
    Gamma(a) Q = int_x^inf t^(a-1) e^-t dt: dQ/da = I / Gamma(a) - Q digamma(a) with
    I = int_x^inf t^(a-1) e^-t log t dt by Gauss-Laguerre in u = t - x. Where neither
    converges (x <= a + 1 with a > 1000) the tangent is NaN rather than inaccurate."""
    lead = (-1,) + (1,) * a.dim()
    k = torch.arange(_SERIES_TERMS, dtype=a.dtype, device=a.device).reshape(lead)
    logx = torch.log(x)
    terms = torch.exp((a + k) * logx - x - torch.lgamma(a + k + 1))
    series = (terms * (logx - torch.digamma(a + k + 1))).sum(0)
    u, w = _gauss_laguerre(_LAGUERRE_NODES, a.dtype, a.device)
    t = x + u.reshape(lead)
    logt = torch.log(t)
    integral = (w.reshape(lead) * torch.exp((a - 1) * logt - x - torch.lgamma(a)) * logt).sum(0)
    tail = (1 - p_val) * torch.digamma(a) - integral
    da = torch.where(x <= a + 1, series, tail)
    da = torch.where((x <= a + 1) & (a > 1000), torch.full_like(da, float("nan")), da)
    return torch.where(x == 0, torch.zeros_like(da), da)


def _igamma_dx(a, x):
    """d/dx P(a, x) = x^(a-1) e^-x / Gamma(a) (xlogy: the a = 1, x = 0 limit is 1)."""
    return torch.exp(torch.xlogy(a - 1, x) - x - torch.lgamma(a))


reg(aten.igamma.default, elementwise(aten.igamma.default, lambda a, x, y: _igamma_da(a, x, y),
                                     lambda a, x, y: _igamma_dx(a, x)))
reg(aten.igammac.default, elementwise(aten.igammac.default, lambda a, x, y: -_igamma_da(a, x, 1 - y),
                                      lambda a, x, y: -_igamma_dx(a, x)))

_ZETA_TERMS = 16


def _zeta_ds(s, q):
    """d/ds zeta(s, q) = -sum_k log(k + q) (k + q)^-s: _ZETA_TERMS terms directly, the
    rest by Euler-Maclaurin (the integral, f(N) / 2, -f'(N) / 12 and f'''(N) / 720; the
    next term is below 1e-10 relative for s > 1, q > 0)."""
    lead = (-1,) + (1,) * s.dim()
    k = torch.arange(_ZETA_TERMS, dtype=s.dtype, device=s.device).reshape(lead)
    v = k + q
    direct = (torch.log(v) * v ** -s).sum(0)
    big = _ZETA_TERMS + q
    log_big = torch.log(big)
    integral = big ** (1 - s) * (log_big / (s - 1) + 1 / (s - 1) ** 2)
    f0 = log_big * big ** -s
    f1 = big ** (-s - 1) * (1 - s * log_big)
    f3 = big ** (-s - 3) * (-s * (s + 1) * (s + 2) * log_big + 3 * s * s + 6 * s + 2)
    return -(direct + integral + f0 / 2 - f1 / 12 + f3 / 720)


reg(aten.special_zeta.default, elementwise(aten.special_zeta.default, lambda s, q, y: _zeta_ds(s, q),
                                           lambda s, q, y: -s * S.zeta(s + 1, q)))
reg(aten.special_zeta.self_scalar, elementwise(aten.special_zeta.self_scalar, None,
                                               lambda s, q, y: -s * S.zeta(s + 1, q)))
reg(aten.special_zeta.other_scalar, elementwise(aten.special_zeta.other_scalar,
                                                lambda s, q, y: _zeta_ds(s, torch.full_like(s, q)), None))


# torch.func.jvp returns zero tangents for all of these: finite differences are the oracle
NO_TORCH_FUNC = dict(check_torch_func=False)
TEST_CASES = [
    case("igamma_both_regions", lambda a, x: torch.igamma(a, x) + torch.igammac(a, x) * 2,
         lambda: (torch.tensor([0.3, 1.0, 2.5, 7.0, 40.0, 0.8], dtype=torch.float64),
                  torch.tensor([0.2, 3.0, 1.0, 12.0, 35.0, 0.0], dtype=torch.float64)), **NO_TORCH_FUNC),
    case("zeta", lambda s, q: S.zeta(s, q), lambda: (rand(3, 4, lo=1.1, hi=6.0), rand(3, 4, lo=0.1, hi=4.0)),
         **NO_TORCH_FUNC),
    case("zeta_scalar_q", lambda s: S.zeta(s, 2.5), lambda: (rand(5, lo=1.5, hi=3.0),), **NO_TORCH_FUNC),
    case("bessel_j_y", lambda x: S.bessel_j0(x) + S.bessel_j1(x) * 2 + S.bessel_y0(x) + S.bessel_y1(x) * 3,
         lambda: (rand(3, 4, lo=0.2, hi=8.0),), **NO_TORCH_FUNC),
    case("bessel_j1_at_zero", lambda x: S.bessel_j1(x) + S.modified_bessel_i1(x) + S.spherical_bessel_j0(x),
         lambda: (torch.tensor([0.0, 0.5, -1.5, 3.0], dtype=torch.float64),), **NO_TORCH_FUNC),
    case("modified_bessel", lambda x: S.modified_bessel_i0(x) + S.modified_bessel_i1(x) + S.modified_bessel_k0(x)
         + S.modified_bessel_k1(x) + S.scaled_modified_bessel_k0(x) + S.scaled_modified_bessel_k1(x),
         lambda: (rand(3, 4, lo=0.2, hi=5.0),), **NO_TORCH_FUNC),
    case("chebyshev", lambda x: S.chebyshev_polynomial_t(x, 5) + S.chebyshev_polynomial_u(x, 4) * 2
         + S.chebyshev_polynomial_v(x, 3) + S.chebyshev_polynomial_w(x, 6), lambda: (rand(3, 4, lo=-2.0, hi=2.0),), **NO_TORCH_FUNC),
    case("chebyshev_tensor_degree", lambda x, n: S.chebyshev_polynomial_t(x, n) + S.chebyshev_polynomial_u(x, n)
         + S.shifted_chebyshev_polynomial_w(x, n), lambda: (rand(5, lo=-0.9, hi=0.9), torch.tensor([0.5, 1.5, 2.5, 4.3, 7.2], dtype=torch.float64)), **NO_TORCH_FUNC),
    case("polynomials_at_singular_points", lambda x: S.chebyshev_polynomial_u(x, 3) + S.legendre_polynomial_p(x, 4)
         + S.laguerre_polynomial_l(x, 3), lambda: (torch.tensor([-1.0, 0.0, 1.0, 0.3], dtype=torch.float64),),
         atol=1e-5, **NO_TORCH_FUNC),
    case("hermite_laguerre_legendre", lambda x: S.hermite_polynomial_h(x, 4) + S.hermite_polynomial_he(x, 5)
         + S.laguerre_polynomial_l(x, 3) + S.legendre_polynomial_p(x, 6), lambda: (randn(3, 4),), **NO_TORCH_FUNC),
    case("polynomial_number_x", lambda n: S.legendre_polynomial_p(0.3, n) * 1.0,
         lambda: (torch.tensor([0.5, 1.5, 2.5, 4.5], dtype=torch.float64),),
         **NO_TORCH_FUNC),
    case("shifted_chebyshev", lambda x: S.shifted_chebyshev_polynomial_t(x, 4) + S.shifted_chebyshev_polynomial_u(x, 3)
         + S.shifted_chebyshev_polynomial_v(x, 5) + S.shifted_chebyshev_polynomial_w(x, 2), lambda: (rand(3, 4),), **NO_TORCH_FUNC),
]
