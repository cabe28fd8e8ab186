"""Elementwise math: unary and binary ops, activations, comparisons (zero derivative).

Each rule is one line through ``unary`` (dy = f'(x) dx, f' may reuse y), ``elementwise``
(a partial per argument, broadcasting handled), ``zero`` or ``linear``. Derivatives at
kinks follow PyTorch's conventions (relu'(0) = 0, clamp at the boundary passes, ties of
maximum split the tangent) so that the two oracles agree.
"""
import math

import torch

from torch_fwd.combinators import elementwise, fused, linear, unary, with_kernel, zero
from torch_fwd.engine import for_autograd
from torch_fwd.registry import call_op, library_rule as reg
from torch_fwd.tangent import align, tadd

from ._cases import case, rand, randn

aten = torch.ops.aten


def _f(mask, like):
    return mask.to(like.dtype)


def _silu_deriv(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


# ---- unary: dy = f'(x, y) dx ----------------------------------------------------------
# (a derivative that is a mask stays boolean where the tangent is only multiplied by it:
# t * mask promotes to t's dtype in one op, where a cast first would be a second)
UNARY = {
    aten.abs.default: lambda x, y: torch.sign(x),
    aten.sin.default: lambda x, y: torch.cos(x),
    aten.cos.default: lambda x, y: -torch.sin(x),
    aten.tan.default: lambda x, y: 1 + y * y,
    aten.exp.default: lambda x, y: y,
    aten.exp2.default: lambda x, y: y * math.log(2.0),
    aten.expm1.default: lambda x, y: y + 1,
    aten.log.default: lambda x, y: x.reciprocal(),
    aten.log2.default: lambda x, y: (x * math.log(2.0)).reciprocal(),
    aten.log10.default: lambda x, y: (x * math.log(10.0)).reciprocal(),
    aten.log1p.default: lambda x, y: (1 + x).reciprocal(),
    aten.sqrt.default: lambda x, y: 0.5 / y,
    aten.rsqrt.default: lambda x, y: -0.5 * y * y * y,
    aten.reciprocal.default: lambda x, y: -y * y,
    aten.erf.default: lambda x, y: (2 / math.sqrt(math.pi)) * torch.exp(-x * x),
    aten.erfc.default: lambda x, y: (-2 / math.sqrt(math.pi)) * torch.exp(-x * x),
    aten.erfinv.default: lambda x, y: (math.sqrt(math.pi) / 2) * torch.exp(y * y),
    aten.asin.default: lambda x, y: torch.rsqrt(1 - x * x),
    aten.acos.default: lambda x, y: -torch.rsqrt(1 - x * x),
    aten.atan.default: lambda x, y: (1 + x * x).reciprocal(),
    aten.sinh.default: lambda x, y: torch.cosh(x),
    aten.cosh.default: lambda x, y: torch.sinh(x),
    aten.asinh.default: lambda x, y: torch.rsqrt(x * x + 1),
    aten.acosh.default: lambda x, y: torch.rsqrt(x * x - 1),
    aten.atanh.default: lambda x, y: (1 - x * x).reciprocal(),
    aten.lgamma.default: lambda x, y: torch.digamma(x),
    aten.digamma.default: lambda x, y: torch.polygamma(1, x),
    aten.frac.default: lambda x, y: torch.ones_like(x),
    aten.nan_to_num.default: lambda x, y, *a: torch.isfinite(x),
    aten.clamp.default: lambda x, y, lo=None, hi=None: _f(
        (x >= lo if lo is not None else torch.ones_like(x, dtype=torch.bool))
        & (x <= hi if hi is not None else torch.ones_like(x, dtype=torch.bool)), x),
    aten.clamp_min.default: lambda x, y, lo: x >= lo,
    aten.clamp_max.default: lambda x, y, hi: x <= hi,
    # (x ** 2: 2x, one op where pow(x, 1) * 2 is two)
    aten.pow.Tensor_Scalar: lambda x, y, e: torch.zeros_like(x) if e == 0 else x * 2 if e == 2 else
        e * torch.pow(x, e - 1),
    aten.logit.default: lambda x, y, eps=None: (x * (1 - x)).reciprocal() if eps is None
        else torch.where((x < eps) | (x > 1 - eps), torch.zeros_like(x), (x * (1 - x)).reciprocal()),
}
# PyTorch's fused derivative kernels, dy = backward(dx, x, y, *params) in one op: the
# formulas torch's own forward AD uses (so the kinks follow torch), where f'(x) * dx
# would be up to nine ops (gelu), each a kernel launch and a Python call in the graph and
# eager paths. Their tangent broadcasts against x like any binary op. (tanh and sigmoid
# keep the formula for complex inputs: the kernels conjugate, for backpropagation.)
FUSED = {
    aten.relu.default: lambda t, x, y: aten.threshold_backward.default(t, y, 0),
    # (gelu_backward's oneDNN path on CPU fails on a broadcast input: x expanded first)
    aten.gelu.default: lambda t, x, y, approximate="none": aten.gelu_backward.default(
        t, x.expand_as(t), approximate=approximate),
    # (silu_backward and hardsigmoid_backward have no derivative in autograd: a graph
    # autograd will differentiate gets the formula)
    aten.silu.default: lambda t, x, y: t * _silu_deriv(x) if for_autograd() else aten.silu_backward.default(t, x),
    aten.softplus.default: lambda t, x, y, beta, threshold: aten.softplus_backward.default(t, x, beta, threshold),
    aten.elu.default: lambda t, x, y, alpha, scale, input_scale: aten.elu_backward.default(
        t, alpha, scale, input_scale, False, x),
    aten.leaky_relu.default: lambda t, x, y, slope: aten.leaky_relu_backward.default(t, x, slope, False),
    aten.hardtanh.default: lambda t, x, y, lo, hi: aten.hardtanh_backward.default(t, x, lo, hi),
    aten.hardsigmoid.default: lambda t, x, y: t * (_f((x > -3) & (x < 3), x) / 6) if for_autograd()
        else aten.hardsigmoid_backward.default(t, x),
    aten.hardswish.default: lambda t, x, y: aten.hardswish_backward.default(t, x),
    aten.tanh.default: lambda t, x, y: t * (1 - y * y) if y.is_complex() else aten.tanh_backward.default(t, y),
    aten.sigmoid.default: lambda t, x, y: t * (y * (1 - y)) if y.is_complex() else aten.sigmoid_backward.default(t, y),
}
# ops with a fused Triton kernel (triton_kernels/elementwise.py): the kernel's name and
# its two float parameters, from the op's arguments; None: this call has no kernel
KERNEL_UNARY = {
    aten.gelu.default: lambda x, approximate="none": ("gelu" if approximate == "none" else "gelu_tanh", 0.0, 0.0),
    aten.silu.default: lambda x: ("silu", 0.0, 0.0),
    aten.sigmoid.default: lambda x: ("sigmoid", 0.0, 0.0),
    aten.tanh.default: lambda x: ("tanh", 0.0, 0.0),
    aten.softplus.default: lambda x, beta, threshold: ("softplus", float(beta), float(threshold)),
    aten.elu.default: lambda x, alpha, scale, input_scale: ("elu", float(alpha), 0.0)
    if scale == 1 and input_scale == 1 else None,
    aten.exp.default: lambda x: ("exp", 0.0, 0.0),
    aten.log.default: lambda x: ("log", 0.0, 0.0),
    aten.sin.default: lambda x: ("sin", 0.0, 0.0),
    aten.cos.default: lambda x: ("cos", 0.0, 0.0),
}


def _unary_kernel(op):
    def try_kernel(p, t):
        x, tx = p[0], t[0]
        if tx is None:
            return None
        from torch_fwd.triton_kernels import elementwise as kernels
        spec = KERNEL_UNARY[op](*p)
        if spec is None or not kernels.unary_applies(x, tx):
            return None
        return kernels.unary_jvp(x, tx, *spec)
    return try_kernel


for _op, _rule in [(op, unary(op, d)) for op, d in UNARY.items()] + [(op, fused(op, b)) for op, b in FUSED.items()]:
    reg(_op, with_kernel(_rule, _unary_kernel(_op)) if _op in KERNEL_UNARY else _rule)

reg(aten.polygamma.default, elementwise(aten.polygamma.default, None, lambda n, x, y: torch.polygamma(n + 1, x)))


def _log_sigmoid_forward(p, t):
    out = aten.log_sigmoid_forward.default(p[0])  # (y, buffer); on CPU buffer = exp(-|x|)
    if t[0] is None:
        return out, None
    x, buffer = p[0], out[1]
    # the buffer moves with x: log_sigmoid_backward (its decomposition) reads it, so a
    # Hessian through that backward needs its tangent (on CUDA it is empty)
    # (autograd treats the buffer as a constant: rebuilt when that matters)
    if buffer.numel() and for_autograd():
        buffer = torch.exp(-x.abs())
    tbuf = -torch.sign(x) * buffer * t[0] if buffer.numel() else None
    return out, (t[0] * torch.sigmoid(-x), tbuf)


reg(aten.log_sigmoid_forward.default, _log_sigmoid_forward)

# ---- zero derivative: piecewise constant or non-floating results ------------------------
ZERO = [
    aten.sign.default, aten.sgn.default, aten.floor.default, aten.ceil.default, aten.round.default,
    aten.round.decimals, aten.trunc.default, aten.heaviside.default, aten.floor_divide.default,
    aten.signbit.default,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.logical_not.default, aten.logical_and.default, aten.logical_or.default, aten.logical_xor.default,
    aten.isnan.default, aten.isinf.default, aten.isposinf.default, aten.isneginf.default,
]
for _op in ZERO:
    reg(_op, zero(_op))

# ---- binary -----------------------------------------------------------------------------
def _binary_kernel(div):
    def try_kernel(p, t):
        a, b = p[0], p[1]
        from torch_fwd.triton_kernels import elementwise as kernels
        if not kernels.binary_applies(a, b, t[0], t[1]):
            return None
        return kernels.binary_jvp(a, b, t[0], t[1], div)
    return try_kernel


# (b may be a Python number in a traced graph; `1 / b` of a tensor is reciprocal(b) * 1, two ops)
_div_tensor = with_kernel(elementwise(aten.div.Tensor, lambda a, b, y: b.reciprocal() if isinstance(b, torch.Tensor)
                                      else 1 / b, lambda a, b, y: -y / b),
                          _binary_kernel(True))
_div_scalar = linear(aten.div.Scalar, lambda t, x, s: t / s)
reg(aten.div.Tensor, _div_tensor)
reg(aten.div.Scalar, _div_scalar)


def _div_mode(op, without_mode):
    """div with a rounding mode is piecewise constant -- but only when a mode is given."""
    def rule(p, t):
        if p[2] is None:
            return without_mode(p[:2], t[:2])
        return call_op(op, p), None
    return rule


reg(aten.div.Tensor_mode, _div_mode(aten.div.Tensor_mode, _div_tensor))
reg(aten.div.Scalar_mode, _div_mode(aten.div.Scalar_mode, _div_scalar))
reg(aten.mul.Tensor, with_kernel(elementwise(aten.mul.Tensor, lambda a, b, y: b, lambda a, b, y: a),
                                 _binary_kernel(False)))
reg(aten.mul.Scalar, linear(aten.mul.Scalar, lambda t, x, s: t * s))
reg(aten.neg.default, linear(aten.neg.default, lambda t, x: -t))


def _add_like(op, sign):
    """add/sub: dy = da + sign * alpha * db."""
    def rule(p, t):
        scale = sign * p[2]
        tb = t[1] if t[1] is None or scale == 1 else t[1] * scale
        return op(p[0], p[1], alpha=p[2]), tadd(t[0], tb)
    return rule


reg(aten.add.Tensor, _add_like(aten.add.Tensor, 1))
reg(aten.sub.Tensor, _add_like(aten.sub.Tensor, -1))
reg(aten.add.Scalar, linear(aten.add.Scalar, lambda t, *a: t, homogeneous=False))
reg(aten.sub.Scalar, linear(aten.sub.Scalar, lambda t, *a: t, homogeneous=False))
reg(aten.rsub.Scalar, linear(aten.rsub.Scalar, lambda t, x, s, alpha: -alpha * t, homogeneous=False))
reg(aten.rsub.Tensor, lambda p, t: (aten.rsub.Tensor(p[0], p[1], alpha=p[2]),
                                   tadd(None if t[0] is None else -p[2] * t[0], t[1])))


def _where(p, t):
    cond, a, b = p
    y = torch.where(cond, a, b)
    ta, tb = t[1], t[2]
    if ta is None and tb is None:
        return y, None
    nd = y.dim()
    ta = align(ta, nd) if ta is not None else torch.zeros((), dtype=y.dtype, device=y.device)
    tb = align(tb, nd) if tb is not None else torch.zeros((), dtype=y.dtype, device=y.device)
    return y, torch.where(cond, ta, tb)


reg(aten.where.self, _where)
reg(torch.ops.prims.where.default, _where)


def _pow_base_deriv(x, e, y):
    return torch.where(e == 0, torch.zeros_like(y), e * torch.pow(x, e - 1))


def _pow_exp_deriv(x, e, y):
    # PyTorch's convention: 0 where the base is 0 and the exponent non-negative.
    return torch.where((x == 0) & (e >= 0), torch.zeros_like(y), y * torch.log(x))


reg(aten.pow.Tensor_Tensor, elementwise(aten.pow.Tensor_Tensor, _pow_base_deriv, _pow_exp_deriv))
reg(aten.pow.Scalar, elementwise(aten.pow.Scalar, None, lambda s, e, y: y * math.log(s) if s > 0 else
                                 torch.where(e >= 0, torch.zeros_like(y), y * math.log(s) if s != 0 else y)))
reg(aten.atan2.default, elementwise(aten.atan2.default, lambda a, b, y: b / (a * a + b * b),
                                    lambda a, b, y: -a / (a * a + b * b)))


def _tie(a, b, y):
    return _f(a > b, y) + 0.5 * _f(a == b, y)


reg(aten.maximum.default, elementwise(aten.maximum.default, lambda a, b, y: _tie(a, b, y), lambda a, b, y: _tie(b, a, y)))
reg(aten.minimum.default, elementwise(aten.minimum.default, lambda a, b, y: _tie(b, a, y), lambda a, b, y: _tie(a, b, y)))
reg(aten.fmod.Tensor, elementwise(aten.fmod.Tensor, lambda a, b, y: torch.ones_like(y), lambda a, b, y: -torch.trunc(a / b)))
reg(aten.fmod.Scalar, linear(aten.fmod.Scalar, lambda t, *a: t, homogeneous=False))
# the float next to a towards b: a itself to first order (torch 2.12 has no formula of its own)
reg(aten.nextafter.default, elementwise(aten.nextafter.default, lambda a, b, y: 1.0, None))
reg(aten.remainder.Tensor, elementwise(aten.remainder.Tensor, lambda a, b, y: torch.ones_like(y), lambda a, b, y: -torch.floor(a / b)))
reg(aten.remainder.Scalar, linear(aten.remainder.Scalar, lambda t, *a: t, homogeneous=False))
reg(aten.logaddexp.default, elementwise(aten.logaddexp.default, lambda a, b, y: torch.exp(a - y), lambda a, b, y: torch.exp(b - y)))
reg(aten.hypot.default, elementwise(aten.hypot.default, lambda a, b, y: a / y, lambda a, b, y: b / y))
reg(aten.xlogy.Tensor, elementwise(aten.xlogy.Tensor, lambda x, z, y: torch.where(x == 0, torch.zeros_like(y), torch.log(z)),
                                   lambda x, z, y: x / z))
reg(aten.lerp.Scalar, elementwise(aten.lerp.Scalar, lambda a, b, w, y: 1 - w, lambda a, b, w, y: w))
reg(aten.lerp.Tensor, elementwise(aten.lerp.Tensor, lambda a, b, w, y: 1 - w, lambda a, b, w, y: w, lambda a, b, w, y: b - a))
reg(aten.addcmul.default, elementwise(aten.addcmul.default, lambda s, a, b, v, y: torch.ones_like(y),
                                      lambda s, a, b, v, y: v * b, lambda s, a, b, v, y: v * a))
reg(aten.addcdiv.default, elementwise(aten.addcdiv.default, lambda s, a, b, v, y: torch.ones_like(y),
                                      lambda s, a, b, v, y: v / b, lambda s, a, b, v, y: -v * a / (b * b)))


def _clamp_tensor(p, t):
    """clamp = min(max(x, lo), hi), differentiated as that composition (so lo > hi, where the
    result is hi, is right too)."""
    x, lo, hi = p
    y = aten.clamp.Tensor(x, lo, hi)
    if all(ti is None for ti in t):
        return y, None
    nd = y.dim()
    zero_ = torch.zeros((), dtype=y.dtype, device=y.device)

    def tan(i):
        return align(t[i], nd) if t[i] is not None else zero_
    out, inner = tan(0), x
    if lo is not None:
        out = torch.where(x >= lo, out, tan(1))
        inner = torch.maximum(x, lo)
    if hi is not None:
        out = torch.where(inner <= hi, out, tan(2))
    if out.dim() == 0:  # every tangent was a symbolic zero on the chosen branches
        return y, None
    return y, out


reg(aten.clamp.Tensor, _clamp_tensor)

# ---- test cases ---------------------------------------------------------------------------
F = torch.nn.functional
TEST_CASES = [
    case(name, fn, lambda: (randn(3, 4),)) for name, fn in [
        ("sin", torch.sin), ("cos", torch.cos), ("tan", lambda x: torch.tan(x * 0.3)), ("exp", torch.exp),
        ("exp2", torch.exp2), ("expm1", torch.expm1), ("tanh", torch.tanh), ("sigmoid", torch.sigmoid),
        ("relu", torch.relu), ("gelu", F.gelu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
        ("silu", F.silu), ("softplus", lambda x: F.softplus(x, beta=2.0, threshold=1.5)), ("elu", F.elu),
        ("selu", F.selu), ("celu", lambda x: F.celu(x, 0.7)), ("leaky_relu", lambda x: F.leaky_relu(x, 0.1)),
        ("hardtanh", lambda x: F.hardtanh(x, -0.5, 0.5)), ("hardswish", F.hardswish), ("hardsigmoid", F.hardsigmoid),
        ("erf", torch.erf), ("erfc", torch.erfc), ("atan", torch.atan), ("sinh", torch.sinh), ("cosh", torch.cosh),
        ("asinh", torch.asinh), ("abs", torch.abs), ("neg", torch.neg), ("frac", torch.frac),
        ("sign", torch.sign), ("floor", torch.floor), ("ceil", torch.ceil), ("round", torch.round), ("trunc", torch.trunc),
        ("clamp", lambda x: torch.clamp(x, -0.5, 0.7)), ("clamp_min", lambda x: torch.clamp(x, min=-0.2)),
        ("pow_scalar", lambda x: x ** 3), ("pow_zero", lambda x: x ** 0), ("square", torch.square),
        ("logsigmoid", F.logsigmoid), ("mish", F.mish), ("softsign", F.softsign), ("nan_to_num", torch.nan_to_num),
        ("scalar_ops", lambda x: (2.0 - x) * 3.0 / 4.0 + 1.0 - x.div(2.0)),
        ("comparisons", lambda x: (x > 0).to(x.dtype) * x + (x == x).sum()),
    ]
] + [
    case(name, fn, lambda: (randn(3, 4, positive=True),)) for name, fn in [
        ("log", torch.log), ("log2", torch.log2), ("log10", torch.log10), ("log1p", torch.log1p),
        ("sqrt", torch.sqrt), ("rsqrt", torch.rsqrt), ("reciprocal", torch.reciprocal),
        ("lgamma", torch.lgamma), ("digamma", torch.digamma), ("polygamma", lambda x: torch.polygamma(2, x)),
        ("acosh", lambda x: torch.acosh(x + 1.0)), ("pow_frac", lambda x: x ** 1.7), ("rpow", lambda x: 2.5 ** x),
    ]
] + [
    case(name, fn, lambda: (rand(3, 4, lo=-0.9, hi=0.9),)) for name, fn in [
        ("asin", torch.asin), ("acos", torch.acos), ("atanh", torch.atanh), ("erfinv", torch.erfinv),
        ("logit", lambda x: torch.logit(x.abs() + 0.05)), ("logit_eps", lambda x: torch.logit(x.abs(), eps=0.1)),
    ]
] + [
    case(name, fn, lambda: (randn(3, 1), randn(4))) for name, fn in [
        ("add_bcast", lambda a, b: a + b), ("sub_alpha", lambda a, b: torch.sub(a, b, alpha=2.0)),
        ("mul_bcast", lambda a, b: a * b), ("div_bcast", lambda a, b: a / (b.abs() + 1)),
        ("rsub", lambda a, b: torch.rsub(a, b, alpha=1.5)), ("atan2", torch.atan2), ("maximum", torch.maximum),
        ("minimum", torch.minimum), ("hypot", torch.hypot), ("logaddexp", torch.logaddexp),
        ("where", lambda a, b: torch.where(a > b, a * 2, b)), ("where_one_side", lambda a, b: torch.where(a > 0, a, 0.0)),
        ("fmod", lambda a, b: torch.fmod(a, b.abs() + 0.5)), ("remainder", lambda a, b: torch.remainder(a, b.abs() + 0.5)),
        ("nextafter", torch.nextafter),
        ("div_floor", lambda a, b: torch.div(a, b.abs() + 1, rounding_mode="floor") + a),
        ("div_scalar_no_mode", lambda a, b: torch.ops.aten.div.Scalar_mode(a, 3.0, rounding_mode=None) + b),
        ("div_tensor_no_mode", lambda a, b: torch.ops.aten.div.Tensor_mode(a, b.abs() + 1, rounding_mode=None)),
        ("floor_divide", lambda a, b: torch.floor_divide(a, b.abs() + 1) + b),
        ("heaviside", lambda a, b: torch.heaviside(a, b) * b),
        ("clamp_tensor", lambda a, b: torch.clamp(a, min=b - 0.3, max=b + 0.3)),
        ("lerp", lambda a, b: torch.lerp(a, b, 0.3)), ("lerp_tensor", lambda a, b: torch.lerp(a, b, torch.sigmoid(a))),
        ("addcmul", lambda a, b: torch.addcmul(a, a, b, value=0.5)),
        ("addcdiv", lambda a, b: torch.addcdiv(a, a, b.abs() + 1, value=0.5)),
    ]
] + [
    case("pow_tensor", lambda a, b: a ** b, lambda: (randn(3, 4, positive=True), randn(3, 4))),
    case("xlogy", torch.xlogy, lambda: (randn(3, 4), randn(3, 4, positive=True))),
    case("scalar_tensor_mix", lambda a, b: a * b + b.exp(), lambda: (randn(), randn(2, 3))),
    # at ties maximum/minimum split the tangent evenly, which is what central differences see
    case("maximum_ties", torch.maximum, lambda: (lambda x: (x, x.clone()))(randn(5))),
    case("minimum_ties", torch.minimum, lambda: (lambda x: (x, x.clone()))(randn(5))),
    # the saved buffer (exp(-|x|) on CPU) moves with x; torch.func gives it a zero tangent
    case("log_sigmoid_forward_buffer", lambda x: torch.ops.aten.log_sigmoid_forward.default(x),
         lambda: (randn(3, 4),), check_torch_func=False),
] + [
    # float32: gelu_backward's oneDNN path (taken for float32 on CPU) and the other fused
    # derivative kernels with a tangent of K directions broadcast against x
    case(f"{name}_float32", fn, lambda: (randn(4, 8).float(),), atol=1e-4, rtol=1e-3) for name, fn in [
        ("gelu", F.gelu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")), ("silu", F.silu),
        ("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("relu", torch.relu), ("elu", F.elu),
        ("hardswish", lambda x: F.hardswish(x * 4)), ("leaky_relu", lambda x: F.leaky_relu(x, 0.1))]
]
