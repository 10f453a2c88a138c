"""Approximations of non-linear functions on fixed-point values (public or shared).

Every function takes and returns a :class:`~veil.mpc.fixed.FixedPrecisionTensor` and uses
only additions, products (Beaver triples when shared), public scalings and the exact
comparison protocol, so it runs unchanged on public and on secret-shared values. Inside,
values are carried with more fractional bits than the tensor's ``f`` while they are small
(up to 28), so that rounding errors are not amplified by repeated squaring. Each docstring
states the protocol, the input domain and the maximum error measured on it (for the default
``f = 16``; ``f`` must be at most 24). Outside the stated domain the results are wrong:
shared values cannot be checked, so callers must respect it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from veil.mpc import _ranges as R
from veil.mpc import _values as V
from veil.mpc import encoding
from veil.mpc.fixed import FixedPrecisionTensor

FPT = FixedPrecisionTensor
_WIDE = 28  # fractional bits used for small intermediate values


def _rescale(a: Any, fa: int, fb: int) -> Any:
    """Ring value ``a`` with ``fa`` fractional bits, re-expressed with ``fb``."""
    if fb > fa:
        return V.mul_int(a, 1 << (fb - fa))
    if fb < fa:
        return V.truncate(a, fa - fb)
    return a


def _times(a: Any, value: float, fa: int, fout: int) -> Any:
    """``a * value`` (public real ``value``) from ``fa`` to ``fout`` fractional bits."""
    m, s = encoding.scalar_multiplier(value)
    bits = s + fa - fout
    if bits <= 0:
        return V.mul_int(a, m << (-bits))
    return V.truncate(a, bits, m)


def _mul(a: Any, b: Any, fa: int, fb: int, fout: int) -> Any:
    """Product of ring values with ``fa`` and ``fb`` bits, returned with ``fout`` bits."""
    bits = fa + fb - fout
    if bits < 0:
        return V.mul_int(V.product(a, b), 1 << (-bits))
    return V.product(a, b, "mul", (), bits)


def _const(value: float, f: int) -> int:
    return round(value * 2.0**f)


def _out(x: FixedPrecisionTensor, child: Any) -> FixedPrecisionTensor:
    return FPT(child, x.precision_bits, x.dtype)


def _check(x: FixedPrecisionTensor) -> int:
    f = x.precision_bits
    if f > 24:
        raise ValueError(f"approximations need precision_bits <= 24, got {f}")
    return f


# ---------------------------------------------------------------------- exp

_EXP_K = 8  # exp(x) = exp(x / 2^8)^(2^8)
_EXP_MAX = 20.0  # largest input: exp(20) * 2^(2*15) stays below 2^61 in the last square
_EXP_MIN = -384.0  # smallest input: p(t) keeps decaying down to t = -1.5


def _exp_child(a: Any, f: int, f_out: int | None = None) -> Any:
    """exp of ring value ``a`` (``f`` bits) as a ring value with ``f_out`` bits (default
    ``f``; up to 28 when the result is known to stay small)."""
    w = _WIDE
    t = _rescale(a, f, w - _EXP_K)  # t = a / 2^8, carried with 28 bits
    t2 = V.product(t, t, "mul", (), w)
    both = V.product(V.cat([t2, t2], "stack", 0), V.cat([t, t2], "stack", 0), "mul", (), w)
    t3, t4 = V.shape_op(both, "select", 0, 0), V.shape_op(both, "select", 0, 1)
    s = 24
    acc = V.add(
        V.add(V.mul_int(t2, _const(1 / 2, s)), V.mul_int(t3, _const(1 / 6, s))),
        V.mul_int(t4, _const(1 / 24, s)),
    )
    y = V.add(V.add(V.truncate(acc, s), t), 1 << w)  # 1 + t + t^2/2 + t^3/6 + t^4/24
    f_prev = w
    for j in range(1, _EXP_K + 1):
        if j < _EXP_K:
            bound = math.log2(math.exp(_EXP_MAX * 2**j / 2**_EXP_K))
            f_next = min(w, int(29.5 - bound))
        else:
            f_next = f if f_out is None else f_out
        y = _mul(y, y, f_prev, f_prev, f_next)
        f_prev = f_next
    return y


def _lifted(a: Any, f: int) -> Any:
    """``max(a, -384)`` (one ReLU): below that, ``exp`` is 0 at 16 fractional bits, and the
    Taylor stage of :func:`_exp_child` grows again."""
    floor = _const(_EXP_MIN, f)
    _, lifted = V.relu(V.add(a, -floor))
    return V.add(lifted, floor)


def exp(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``exp(x)`` for ``x <= 20`` (``exp(20) * 2^16`` is close to the ring's limit).

    Protocol: ``x`` is raised to at least ``-384`` (one ReLU); ``t = x / 256`` (exact,
    carried with 28 fractional bits); the degree-4 Taylor polynomial ``p(t)`` from the
    powers ``t^2`` (one product) and ``t^3, t^4`` (one batched product), with the public
    coefficients applied in one truncation; then eight squarings ``p(t)^(2^8)``, each with
    as many fractional bits as the growing value allows. Twenty-one rounds when shared, plus
    the ReLU's.

    Error (measured, f = 16): relative error below 2e-4 for ``exp(x) >= 1e-2`` and absolute
    error below 3e-5 below that.
    """
    f = _check(x)
    return _out(x, _exp_child(_lifted(x.child, f), f))


# ---------------------------------------------------------------------- reciprocal


def _newton_reciprocal(a: Any, y: Any, f: int, iterations: int) -> Any:
    """``y <- y * (2 - a * y)`` on ring values with ``f`` bits."""
    two = 2 << f
    for _ in range(iterations):
        ay = V.product(a, y, "mul", (), f)
        y = V.product(y, V.sub(two, ay), "mul", (), f)
    return y


def _reciprocal_positive(a: Any, f: int) -> Any:
    """``1 / a`` (``f`` bits) for ``a`` in the domain of :func:`reciprocal`."""
    w = R.WIDTH
    onehot, u, js = R.reduce(a, f)  # u = a / 4^j in [1, 4)
    y = V.sub(_const(0.975, w), _times(u, 0.195, w, w))  # relative error below 0.22
    y = _newton_reciprocal(u, y, w, 4)  # 0.22 -> 4.8e-2 -> 2.3e-3 -> 5.5e-6 -> 3e-11
    # y is below 1 on the domain; down to one ring unit (u >= 1/4) it stays below 4
    bits = [w + 3] * len(js)
    return R.select_shifted(onehot, y, [f - w - 2 * j for j in js], bits)


def reciprocal(x: FixedPrecisionTensor, *, positive: bool = False) -> FixedPrecisionTensor:
    """``1 / x`` for ``|x|`` in [2^-14, 2^44) (at f = 16; ``positive=True`` skips the sign
    handling).

    Protocol: for ``x > 0``, the range reduction of :func:`rsqrt` (``u = x / 4^j`` in
    [1, 4), 24 fractional bits), Newton-Raphson ``y <- y (2 - u y)`` (two products per step,
    four steps) from ``y = 0.975 - 0.195 u`` (relative error below 0.22, squared by each
    step), and ``1 / x = sum_j h_j y 4^-j``. For any sign, ``s = [x >= 0]`` (exact
    comparison), ``|x| = x (2s - 1)`` and the result is multiplied by ``2s - 1``.

    Error (measured, f = 16): at most ``1e-5`` relative plus one unit in the last place.
    Below the domain the error grows, to 1.5% at one ring unit; at 0 the result is wrong.
    """
    f = _check(x)
    a = x.child
    if positive:
        return _out(x, _reciprocal_positive(a, f))
    sign = V.sub(V.mul_int(V.sign(a), 2), 1)
    mag = V.product(a, sign)
    return _out(x, V.product(_reciprocal_positive(mag, f), sign))


# ---------------------------------------------------------------------- sigmoid, tanh


def _sigmoid_child(a: Any, f: int) -> Any:
    # One batch of comparisons: s = [x >= 0], and relu(x - B), relu(-x - B) to clamp x to
    # [-B, B] with B = 384, where exp(-|x|) is still in exp's domain (sigmoid(384) is 1).
    bound = _const(-_EXP_MIN, f)
    both = V.cat([a, V.sub(a, bound), V.sub(V.neg(a), bound)], "stack", 0)
    signs, excess = V.relu(both)
    s = V.shape_op(signs, "select", 0, 0)
    over, under = V.shape_op(excess, "select", 0, 1), V.shape_op(excess, "select", 0, 2)
    a = V.add(V.sub(a, over), under)
    pm = V.sub(V.mul_int(s, 2), 1)  # +1 / -1
    mag = V.product(a, pm)  # |x|
    e = _exp_child(V.neg(mag), f)  # exp(-|x|) in (0, 1]
    d = V.add(e, 1 << f)  # 1 + exp(-|x|) in (1, 2]
    y = V.sub(_const(24 / 17, f), _times(d, 8 / 17, f, f))
    y = _newton_reciprocal(d, y, f, 3)  # sigmoid(|x|)
    # sigmoid(x) = sigmoid(|x|) if x >= 0 else 1 - sigmoid(|x|) = (1 - s) + (2s - 1) y
    return V.add(V.product(y, pm), V.mul_int(V.sub(1, s), 1 << f))


def sigmoid(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``1 / (1 + exp(-x))`` for any ``x`` (inputs beyond ``±384`` are clamped to it, where
    the result is 0 or 1 at 16 fractional bits).

    Protocol: in one batch of exact comparisons, ``s = [x >= 0]`` and the ReLUs of
    ``x - 384`` and ``-x - 384``, which clamp ``x`` to [-384, 384]; ``|x| = x (2s - 1)``,
    ``d = 1 + exp(-|x|)`` in (1, 2], ``1 / d`` by three Newton steps from the linear guess
    ``24/17 - 8/17 d`` (relative error at most 1/17 on [1, 2], squared by each step), and
    ``sigmoid(x) = (1 - s) + (2s - 1) / d``.

    Error (measured, f = 16): absolute error below 1e-4.
    """
    f = _check(x)
    return _out(x, _sigmoid_child(x.child, f))


def tanh(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``tanh(x) = 2 sigmoid(2x) - 1`` for any ``x``; absolute error below 2e-4."""
    f = _check(x)
    return _out(x, V.sub(V.mul_int(_sigmoid_child(V.mul_int(x.child, 2), f), 2), 1 << f))


#: ``erf(x) ~ tanh(A x + B x^3)``: A = 2 / sqrt(pi), B = A * 11 / 123.
_ERF_A = 2.0 / math.sqrt(math.pi)
_ERF_B = _ERF_A * 11.0 / 123.0


def erf(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """The error function, for ``|x| <= 12`` (exact GELU, ``nn.GELU()``, is built on it).

    Protocol: ``erf(x) ~ tanh(A x + B x^3)`` with ``A = 2 / sqrt(pi)``, ``B = 11 A / 123``
    (two products for ``x^3``, the public coefficients in one truncation each), then
    :func:`tanh`; ``|x| <= 12`` keeps the argument in tanh's domain.

    Error (measured, f = 16): absolute error below 6e-4 (the formula's own is 3.6e-4, the
    rest is tanh's).
    """
    f = _check(x)
    x2 = V.product(x.child, x.child, "mul", (), f)
    x3 = V.product(x2, x.child, "mul", (), f)
    arg = V.add(_times(x.child, _ERF_A, f, f), _times(x3, _ERF_B, f, f))
    return tanh(_out(x, arg))


# ---------------------------------------------------------------------- log, sqrt


#: ``log(u)`` on [1, 4) as a polynomial of degree 10 in ``t = (u - 2.5) / 1.5`` in [-1, 1]
#: (a Chebyshev fit, made once at import; error below 5e-6).
_LOG_DEGREE = 10
_LOG_COEFFS = tuple(
    float(c)
    for c in np.polynomial.Chebyshev.fit(
        (np.linspace(1.0, 4.0, 4001) - 2.5) / 1.5, np.log(np.linspace(1.0, 4.0, 4001)),
        _LOG_DEGREE, domain=[-1, 1],
    ).convert(kind=np.polynomial.Polynomial).coef
)
#: Fractional bits of the polynomial's public coefficients.
_COEFF_BITS = 24


def log(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """Natural logarithm for ``x`` in [2^-14, 2^44) (at f = 16, as :func:`rsqrt`).

    Protocol: the range reduction of :func:`rsqrt` (``x = 4^j u`` with ``u`` in [1, 4) and
    the one-hot ``h`` of ``j``), then ``log(x) = p(t) + sum_j h_j j log 4`` where ``p`` is a
    degree-10 polynomial in ``t = (u - 2.5) / 1.5`` (:data:`_LOG_COEFFS`, a Chebyshev fit of
    ``log`` on [1, 4)). The powers ``t^2 .. t^10`` take four rounds of products (``t^2``;
    ``t^3, t^4``; ``t^5 .. t^8``; ``t^9, t^10``), the public coefficients one truncation,
    the offset none (public integers times the one-hot).

    Error (measured, f = 16): absolute error below 2e-5. Below the domain the error grows,
    to 0.12 at one ring unit; above it (or at or below 0) the result is wrong.
    """
    f = _check(x)
    w = R.WIDTH
    onehot, u, js = R.reduce(x.child, f)
    t = V.sub(_times(u, 2 / 3, w, w), _const(2.5 / 1.5, w))
    powers = [None, t, V.product(t, t, "mul", (), w)]
    powers += [V.product(powers[2], t, "mul", (), w), V.product(powers[2], powers[2], "mul", (), w)]
    powers += [V.product(powers[4], powers[k], "mul", (), w) for k in (1, 2, 3, 4)]
    powers += [V.product(powers[8], powers[k], "mul", (), w) for k in (1, 2)]
    acc = None
    for k in range(1, _LOG_DEGREE + 1):
        term = V.mul_int(powers[k], _const(_LOG_COEFFS[k], _COEFF_BITS))
        acc = term if acc is None else V.add(acc, term)
    poly = V.add(V.truncate(acc, w + _COEFF_BITS - f), _const(_LOG_COEFFS[0], f))
    offsets = torch.tensor([_const(j * math.log(4.0), f) for j in js], dtype=torch.int64)
    shift = V.shape_op(V.mul_int(onehot, offsets), "sum", [-1], False)
    return _out(x, V.add(poly, shift))


def _root_parts(a: Any, f: int) -> tuple[Any, Any, Any, list[int]]:
    """``(onehot, u, r, js)``: as :func:`veil.mpc._ranges.reduce`, and ``r = 1 / sqrt(u)``
    with ``WIDTH`` fractional bits."""
    w = R.WIDTH
    onehot, u, js = R.reduce(a, f)
    r = V.sub(_const(1.066, w), _times(u, 0.152, w, w))  # relative error below 0.087
    three = 3 << w
    for _ in range(3):  # relative error 0.087 -> 1.2e-2 -> 2e-4 -> 6e-8
        r2 = V.product(r, r, "mul", (), w)
        t = V.sub(three, V.product(u, r2, "mul", (), w))
        r = V.product(r, t, "mul", (), w + 1)  # r (3 - u r^2) / 2
    return onehot, u, r, js


def rsqrt(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``1 / sqrt(x)`` for ``x`` in [2^-14, 2^44) (at f = 16; ``[4^low, 4^(high + 1))`` of
    :func:`veil.mpc._ranges.bins` in general).

    Protocol: range reduction by a power of four, then Newton-Raphson.

    1. ``b_j = [x >= 4^j]`` for every bin bound (exact comparisons, one batch), and the
       one-hot ``h`` of ``x``'s bin ``[4^j, 4^(j + 1))`` from their differences (local);
    2. ``u = sum_j h_j x 4^-j`` in [1, 4), with 24 fractional bits (one product of ``h``
       with ``x``, the powers folded into ``h``, and one truncation);
    3. ``r <- r (3 - u r^2) / 2`` three times from ``r = 1.066 - 0.152 u`` (relative error
       below 0.087, then 1.2e-2, 2e-4, 6e-8);
    4. ``1 / sqrt(x) = sum_j h_j r 2^-j`` (one product, one truncation).

    Error (measured, f = 16): at most ``1e-5`` relative plus one unit in the last place
    (``2^-16``). Below the domain the error grows, to about 2% at one ring unit; above it (or at
    or below 0) the result is wrong. 29 rounds when shared, the reveal included (the direct form on
    [0.05, 150] it replaces took 55).
    """
    f = _check(x)
    onehot, _, r, js = _root_parts(x.child, f)
    bits = [R.WIDTH + 2] * len(js)  # r is at most 1 on the domain, 2 down to one ring unit
    return _out(x, R.select_shifted(onehot, r, [f - R.WIDTH - j for j in js], bits))


def sqrt(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``sqrt(x)`` for ``x`` in [2^-14, 2^44) (at f = 16): as :func:`rsqrt`, then
    ``sqrt(x) = sum_j h_j (u r) 2^j`` (two more products). Error at most ``1e-5`` relative
    plus one unit in the last place."""
    f = _check(x)
    onehot, u, r, js = _root_parts(x.child, f)
    root_u = V.product(u, r, "mul", (), R.WIDTH)  # sqrt(u) in [1, 2)
    bits = [R.WIDTH + 1] * len(js)
    return _out(x, R.select_shifted(onehot, root_u, [f - R.WIDTH + j for j in js], bits))


# ---------------------------------------------------------------------- max, softmax


def max_with_onehot(x: FixedPrecisionTensor, dim: int) -> tuple[Any, Any]:
    """Ring values of ``max(x, dim)`` (dim kept as size 1) and the one-hot of its position.

    Protocol: a tournament. The candidates are halved ``log2(k)`` times, neighbours paired
    (``2i`` with ``2i + 1``, an odd last one passing through), so every candidate to the left
    comes from lower positions; each pairing computes ``s = [a >= b]`` (exact comparison) and
    selects ``b + s (a - b)`` for the value and for the one-hot position vector (one
    product, batched). Ties go to the first index, as torch's ``max`` and ``argmax`` do.
    """
    c = x.child
    dim = dim % x.dim()
    k = x.shape[dim]
    c = V.shape_op(c, "transpose", dim, -1) if dim != x.dim() - 1 else c
    lead = tuple(c.shape[:-1])
    values = V.shape_op(c, "unsqueeze", -1)  # (..., k, 1)
    onehot = torch.eye(k, dtype=torch.int64).expand(*lead, k, k)  # (..., k, k)
    while k > 1:
        half = k // 2
        a = V.shape_op(values, "slice", -2, 0, 2 * half, 2)
        b = V.shape_op(values, "slice", -2, 1, 2 * half, 2)
        oa = V.shape_op(onehot, "slice", -2, 0, 2 * half, 2)
        ob = V.shape_op(onehot, "slice", -2, 1, 2 * half, 2)
        s = V.sign(V.sub(a, b))  # (..., half, 1)
        diff = V.cat([V.sub(a, b), V.sub(oa, ob)], "cat", -1)  # (..., half, 1 + k0)
        picked = V.add(V.cat([b, ob], "cat", -1), V.product(s, diff))
        new_values = V.shape_op(picked, "slice", -1, 0, 1, 1)
        new_onehot = V.shape_op(picked, "slice", -1, 1, None, 1)
        if k % 2:
            new_values = V.cat(
                [new_values, V.shape_op(values, "slice", -2, k - 1, k, 1)], "cat", -2
            )
            new_onehot = V.cat(
                [new_onehot, V.shape_op(onehot, "slice", -2, k - 1, k, 1)], "cat", -2
            )
        values, onehot = new_values, new_onehot
        k = half + (k % 2)
    values = V.shape_op(values, "squeeze.dim", -1)  # (..., 1)
    onehot = V.shape_op(onehot, "squeeze.dim", -2)  # (..., k0)
    if dim != x.dim() - 1:
        values = V.shape_op(values, "transpose", dim, -1)
        onehot = V.shape_op(onehot, "transpose", dim, -1)
    return values, onehot


def shifted_exp(
    x: FixedPrecisionTensor, dim: int, keep: torch.Tensor | None = None
) -> tuple[Any, Any, Any]:
    """Ring values ``(m, e, S)`` shared by the softmax family: ``m = max(x, dim)`` (kept as
    a size-1 dim; a tournament of exact comparisons), ``e = exp(x - m)`` (every ``e`` in
    (0, 1], the largest 1), zeroed where the public 0/1 ``keep`` is 0 (masked attention),
    and ``S = sum(e, dim)`` in [1, k]. Differences below ``-384`` (outside :func:`exp`'s
    domain) are raised to ``-384`` first, ``relu(d + 384) - 384`` (one ReLU), so any
    spread of the inputs is handled: their weights are 0 at 16 fractional bits."""
    f = x.precision_bits
    m, _ = max_with_onehot(x, dim)
    e = _exp_child(_lifted(V.sub(x.child, m), f), f)
    if keep is not None:
        e = V.mul_int(e, keep.to(torch.int64).expand(tuple(x.shape)))
    return m, e, V.shape_op(e, "sum", [dim], True)


def softmax(x: FixedPrecisionTensor, dim: int) -> FixedPrecisionTensor:
    """``softmax(x, dim)`` for differences ``x_i - max(x)`` in [-384, 0], over any number of
    entries along ``dim``.

    Protocol: ``m = max(x, dim)`` (tournament of exact comparisons), ``e = exp(x - m)``
    (so every ``e`` is in (0, 1] and the largest is 1), ``S = sum(e)`` in [1, k]
    (:func:`shifted_exp`), and ``e / S`` with :func:`reciprocal`'s protocol.

    Error (measured, f = 16): absolute error below 1e-3.
    """
    f = _check(x)
    _, e, total = shifted_exp(x, dim)
    return _out(x, V.product(e, _reciprocal_positive(total, f), "mul", (), f))


def log_softmax(x: FixedPrecisionTensor, dim: int) -> FixedPrecisionTensor:
    """``log_softmax(x, dim) = x - m - log(sum(exp(x - m)))``, same domain as
    :func:`softmax`; absolute error below 3e-3."""
    f = _check(x)
    m, _, total = shifted_exp(x, dim)
    return _out(x, V.sub(V.sub(x.child, m), log(FPT(total, f, x.dtype)).child))


def logsumexp(x: FixedPrecisionTensor, dim: int, keepdim: bool = False) -> FixedPrecisionTensor:
    """``logsumexp(x, dim) = m + log(sum(exp(x - m)))`` with ``m = max(x, dim)``: the same
    domain as :func:`softmax` (differences in [-384, 0]; at most 190 entries, so the sum
    stays in :func:`log`'s domain); absolute error below 3e-3."""
    f = _check(x)
    m, _, total = shifted_exp(x, dim)
    out = V.add(m, log(FPT(total, f, x.dtype)).child)
    return _out(x, out if keepdim else V.shape_op(out, "squeeze.dim", dim))


__all__ = [
    "erf",
    "exp",
    "log",
    "log_softmax",
    "logsumexp",
    "max_with_onehot",
    "reciprocal",
    "rsqrt",
    "shifted_exp",
    "sigmoid",
    "softmax",
    "sqrt",
    "tanh",
]
