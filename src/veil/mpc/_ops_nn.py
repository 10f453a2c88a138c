"""aten handlers of FixedPrecisionTensor for neural networks: ReLU and the activations,
softmax, dropout, max and argmax, with their backward operators (so autograd runs them
unchanged). Convolutions, pooling and losses live in ``_ops_conv``, ``_ops_pool`` and
``_ops_losses``."""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import approximations as A
from veil.mpc._ops_fixed import (
    _binary_add,
    _inplace,
    child_of,
    compare,
    fixed_pair,
    multiply,
    reduce_sum,
)
from veil.mpc._ops_scatter import written_at
from veil.mpc._ops_sort import scatter_through_permutation
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def ntuple(v: Any, d: int) -> tuple[int, ...]:
    """An int or a sequence as a ``d``-tuple (torch's convolution and pooling arguments)."""
    if isinstance(v, int):
        return (v,) * d
    v = tuple(v)
    return v * d if len(v) == 1 else v


def bilinear(a: Any, b: Any, kind: str, params: tuple[Any, ...]) -> FixedPrecisionTensor:
    """``op(a, b)`` for fixed-point or public float operands (truncates when both are real)."""
    x = a if type(a) is FPT else b
    f = x.precision_bits
    fa = a.precision_bits if type(a) is FPT else f
    fb = b.precision_bits if type(b) is FPT else f
    ca = child_of(a) if type(a) is FPT else V.LOCAL_OPS["mul"](a.double(), 2.0**f).round().long()
    cb = child_of(b) if type(b) is FPT else V.LOCAL_OPS["mul"](b.double(), 2.0**f).round().long()
    return FPT(V.product(ca, cb, kind, params, min(fa, fb)), max(fa, fb), x.dtype)


# ---------------------------------------------------------------------- ReLU


def relu(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """ReLU with the exact comparison protocol; the mask is kept for the backward pass."""
    mask, out = V.relu(child_of(x))
    result = FPT(out, x.precision_bits, x.dtype)
    result.cache = {"relu_mask": mask}
    return result


@implements(aten.relu)
def _relu(func: Any, args: Any, kwargs: Any) -> Any:
    return relu(args[0])


@implements(aten.relu_)
def _relu_(func: Any, args: Any, kwargs: Any) -> Any:
    out = relu(args[0])
    args[0].cache = out.cache
    return _inplace(out, args[0])


@implements(aten.threshold_backward)
def _threshold_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, result, threshold = args[0], args[1], args[2]
    cache = getattr(result, "cache", None)
    mask = cache.get("relu_mask") if cache and threshold == 0 else None
    if mask is None:
        mask = child_of(compare(result, threshold, "gt"))
    if type(grad) is not FPT:
        grad = FPT(
            V.LOCAL_OPS["mul"](grad.double(), 2.0**result.precision_bits).round().long(),
            result.precision_bits,
            result.dtype,
        )
    return FPT(V.product(child_of(grad), mask), grad.precision_bits, grad.dtype)


@implements(aten.softshrink_backward, aten.hardshrink_backward)
def _shrink_backward(func: Any, args: Any, kwargs: Any) -> Any:
    """The gradient of softshrink and hardshrink: ``grad`` where ``|x| > lambd`` (torch's
    strict inequalities), else 0. One comparison batch (``x > l`` and ``x < -l`` together)
    and one product."""
    grad, x, lambd = args[0], args[1], args[2]
    c = child_of(x)
    lam = round(float(lambd) * (1 << x.precision_bits))
    ge = V.sign(V.cat([V.sub(lam, c), V.add(c, lam)], "stack", 0))  # [l >= x], [x >= -l]
    outside = V.sub(2, V.add(V.shape_op(ge, "select", 0, 0), V.shape_op(ge, "select", 0, 1)))
    if type(grad) is not FPT:  # a public gradient
        return multiply(FPT(outside, 0, torch.bool), grad)
    return FPT(V.product(child_of(grad), outside), grad.precision_bits, grad.dtype)


@implements(aten.softplus_backward)
def _softplus_backward(func: Any, args: Any, kwargs: Any) -> Any:
    """The gradient of ``softplus(x) = log(1 + exp(beta x)) / beta``: ``grad *
    sigmoid(beta x)`` (absolute error below 1e-4), and ``grad`` itself where ``beta x`` is
    above ``threshold`` (softplus is ``x`` there, as in torch): one sigmoid, one comparison
    and two products."""
    grad, x, beta, threshold = args[0], args[1], float(args[2]), float(args[3])
    bx = multiply(x, beta) if beta != 1.0 else x
    slope = torch.where(compare(bx, threshold, "gt"), 1.0, A.sigmoid(bx))
    return multiply(grad, slope)


@implements(aten.rrelu_with_noise)
def _rrelu(func: Any, args: Any, kwargs: Any) -> Any:
    """``nn.RReLU`` in evaluation: a leaky ReLU of slope ``(lower + upper) / 2``. Training
    draws a slope per negative input, which would write the secret signs into torch's plain
    ``noise`` buffer: it raises."""
    x, lower, upper, training = _rrelu_args(args, kwargs)
    if training:
        raise NotImplementedError(
            f"{func} in training mode (its noise buffer would record which inputs are "
            "negative); use nn.LeakyReLU, or RReLU in eval mode"
        )
    return torch.nn.functional.leaky_relu(x, (lower + upper) / 2)


@implements(aten.rrelu_with_noise_backward)
def _rrelu_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, x, _, lower, upper, training = args[:6]
    if training:
        raise NotImplementedError(f"{func} in training mode")
    return aten.leaky_relu_backward(grad, x, (lower + upper) / 2, False)


def _rrelu_args(args: Any, kwargs: Any) -> tuple[Any, float, float, bool]:
    names = ("self", "noise", "lower", "upper", "training")
    a = dict(zip(names, (None, None, 0.125, 1.0 / 3.0, False)))
    a.update(zip(names, args))
    a.update({k: v for k, v in kwargs.items() if k in names})
    return a["self"], float(a["lower"]), float(a["upper"]), bool(a["training"])


# ---------------------------------------------------------------------- activations


def _unary(fn: Any) -> Any:
    def handler(func: Any, args: Any, kwargs: Any) -> Any:
        return fn(args[0])

    return handler


implements(aten.sigmoid)(_unary(A.sigmoid))
implements(aten.tanh)(_unary(A.tanh))
implements(aten.exp)(_unary(A.exp))
implements(aten.log)(_unary(A.log))
implements(aten.reciprocal)(_unary(A.reciprocal))
implements(aten.sqrt)(_unary(A.sqrt))
implements(aten.rsqrt)(_unary(A.rsqrt))
implements(aten.erf)(_unary(A.erf))  # exact GELU runs as torch's decomposition over it


def _unary_(fn: Any) -> Any:
    """The in-place form (``sigmoid_``: GRU cells use it)."""

    def handler(func: Any, args: Any, kwargs: Any) -> Any:
        return _inplace(fn(args[0]), args[0])

    return handler


for _fn, _op in (
    (A.sigmoid, aten.sigmoid_),
    (A.tanh, aten.tanh_),
    (A.exp, aten.exp_),
    (A.log, aten.log_),
    (A.reciprocal, aten.reciprocal_),
    (A.sqrt, aten.sqrt_),
    (A.rsqrt, aten.rsqrt_),
    (A.erf, aten.erf_),
):
    implements(_op)(_unary_(_fn))


@implements(aten.xlogy.Tensor)
def _xlogy(func: Any, args: Any, kwargs: Any) -> Any:
    """``x * log(y)``, 0 where ``x`` is 0 (``F.kl_div``'s ``target * log(target)``): one
    logarithm (2e-5 absolute on [2^-14, 2^44)) and one product. Where ``x`` is 0 the
    product is exactly 0 whatever the logarithm gave, so ``y`` may be 0 there, as in torch;
    a public ``y`` of 0 counts as ``log(y) = 0`` (its ``x`` must be 0, where torch gives
    -inf otherwise)."""
    x, y = args[0], args[1]
    if type(y) is FPT:
        log_y = A.log(y)
    else:
        y = torch.as_tensor(y, dtype=torch.float64)
        log_y = torch.where(y == 0, 0.0, torch.log(y))
    return multiply(x, log_y)


@implements(aten.log_sigmoid)
def _log_sigmoid(func: Any, args: Any, kwargs: Any) -> Any:
    """``log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|))``: ``exp`` on [-384, 0] and ``log``
    on [1, 2], so any ``|x| <= 384`` (BCE with logits decomposes into it); absolute error
    below 1e-3."""
    x = args[0]
    r = relu(x)  # max(x, 0)
    low = _binary_add(x, r, 1, True)  # min(x, 0) = x - max(x, 0)
    neg_abs = _binary_add(low, r, 1, True)  # -|x| = min(x, 0) - max(x, 0)
    soft = A.log(_binary_add(A.exp(neg_abs), 1.0, 1, False))
    return _binary_add(low, soft, 1, True)


@implements(aten.expm1)
def _expm1(func: Any, args: Any, kwargs: Any) -> Any:
    """``exp(x) - 1`` (elu, celu): the accuracy of :func:`~veil.mpc.approximations.exp`."""
    return _binary_add(A.exp(args[0]), 1.0, 1, True)


@implements(aten.log1p)
def _log1p(func: Any, args: Any, kwargs: Any) -> Any:
    """``log(1 + x)`` (softplus, binary cross-entropy): that of
    :func:`~veil.mpc.approximations.log` at ``1 + x``."""
    return A.log(_binary_add(args[0], 1.0, 1, False))


@implements(aten.sigmoid_backward)
def _sigmoid_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, y = args[0], args[1]
    return multiply(grad, multiply(y, _binary_add(1.0, y, 1, True)))


@implements(aten.tanh_backward)
def _tanh_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, y = args[0], args[1]
    return multiply(grad, _binary_add(1.0, multiply(y, y), 1, True))


@implements(aten.abs)
def _abs(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    c = child_of(x)
    pm = V.sub(V.mul_int(V.sign(c), 2), 1)
    return FPT(V.product(c, pm), x.precision_bits, x.dtype)


@implements(aten.sign)
def _sign(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    c = child_of(x)
    ge = V.sign(c)
    le = V.sign(V.neg(c))
    return FPT(V.mul_int(V.sub(ge, le), 1 << x.precision_bits), x.precision_bits, x.dtype)


@implements(aten.maximum, aten.minimum)
def _maximum(func: Any, args: Any, kwargs: Any) -> Any:
    a, b = args[0], args[1]
    ca, cb, f, dtype = fixed_pair(a, b)
    s = V.sign(V.sub(ca, cb))
    if func.overloadpacket is aten.maximum:
        return FPT(V.select(s, ca, cb), f, dtype)
    return FPT(V.select(s, cb, ca), f, dtype)


_CLAMP_OUT = {
    aten.clamp_: aten.clamp,
    aten.clamp_min_: aten.clamp_min,
    aten.clamp_max_: aten.clamp_max,
}


@implements(aten.clamp, aten.clamp_min, aten.clamp_max, *_CLAMP_OUT)
def _clamp(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    packet = _CLAMP_OUT.get(func.overloadpacket, func.overloadpacket)
    lo = args[1] if packet in (aten.clamp, aten.clamp_min) and len(args) > 1 else kwargs.get("min")
    hi = (
        (args[2] if len(args) > 2 else kwargs.get("max"))
        if packet is aten.clamp
        else (args[1] if packet is aten.clamp_max else None)
    )
    out = x
    if lo is not None:
        out = _maximum(aten.maximum.default, (out, lo), {})
    if hi is not None:
        out = _maximum(aten.minimum.default, (out, hi), {})
    return _inplace(out, x) if func.overloadpacket in _CLAMP_OUT else out


# ---------------------------------------------------------------------- softmax family


@implements(aten._softmax, aten.softmax.int, aten._safe_softmax)  # safe: all -inf rows
def _softmax(func: Any, args: Any, kwargs: Any) -> Any:
    return A.softmax(args[0], args[1])


@implements(aten.logsumexp)
def _logsumexp(func: Any, args: Any, kwargs: Any) -> Any:
    """``logsumexp`` over one or more dims (several, or none meaning all, are flattened into
    one) or of a scalar (itself)."""
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim", [])
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if x.dim() == 0:
        return _copy_scalar(x)
    dims = sorted({d % x.dim() for d in dims} if dims else set(range(x.dim())))
    if len(dims) == 1:
        return A.logsumexp(x, dims[0], keepdim)
    rest = [d for d in range(x.dim()) if d not in dims]
    c = V.shape_op(child_of(x), "permute", rest + dims)
    c = V.shape_op(c, "reshape", [*(x.shape[d] for d in rest), -1])
    out = A.logsumexp(FPT(c, x.precision_bits, x.dtype), -1, False)
    if keepdim:
        kept = [1 if d in dims else x.shape[d] for d in range(x.dim())]
        out = FPT(V.shape_op(child_of(out), "reshape", kept), x.precision_bits, x.dtype)
    return out


@implements(aten._log_softmax)
def _log_softmax(func: Any, args: Any, kwargs: Any) -> Any:
    return A.log_softmax(args[0], args[1])


def softmax_backward(grad: Any, out: Any, dim: int) -> FixedPrecisionTensor:
    """The gradient through ``out = softmax(s, dim)``: ``out (grad - sum(grad out, dim))``."""
    inner = reduce_sum(multiply(grad, out), dim, True)
    return multiply(out, _binary_add(grad, inner, 1, True))


@implements(aten._softmax_backward_data)
def _softmax_backward(func: Any, args: Any, kwargs: Any) -> Any:
    return softmax_backward(args[0], args[1], args[2])


@implements(aten._log_softmax_backward_data)
def _log_softmax_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, out, dim = args[0], args[1], args[2]
    total = reduce_sum(grad, dim, True)
    return _binary_add(grad, multiply(A.exp(out), total), 1, True)


# ---------------------------------------------------------------------- dropout


@implements(aten.native_dropout)
def _dropout(func: Any, args: Any, kwargs: Any) -> Any:
    """Dropout with a public mask: which units drop is random and independent of the data,
    so drawing it in the clear (torch's generator) reveals nothing; the kept values are
    scaled by ``1 / (1 - p)`` (a public product)."""
    x, p = args[0], float(args[1])
    train = args[2] if len(args) > 2 else kwargs.get("train", True)
    if train is False or p == 0.0:  # train=None means training, as in torch
        kept = torch.ones(tuple(x.shape), dtype=torch.bool)
        return FPT(child_of(x), x.precision_bits, x.dtype), kept  # a new tensor, as torch
    if p >= 1.0:
        return FPT(V.mul_int(child_of(x), 0), x.precision_bits, x.dtype), torch.zeros(
            tuple(x.shape), dtype=torch.bool
        )
    mask = torch.rand(tuple(x.shape)) >= p
    return multiply(x, mask.to(torch.float64) / (1.0 - p)), mask


@implements(aten.bernoulli_.float)
def _bernoulli_(func: Any, args: Any, kwargs: Any) -> Any:
    """Fill with public 0/1 draws (``F.dropout``'s noise, made with ``empty_like``): data-
    independent randomness, drawn in the clear."""
    x, p = args[0], float(args[1]) if len(args) > 1 else float(kwargs.get("p", 0.5))
    draws = torch.bernoulli(torch.full(tuple(x.shape), p), generator=kwargs.get("generator"))
    x.child = draws.to(torch.int64) << x.precision_bits
    return x


@implements(aten.native_dropout_backward)
def _dropout_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, mask, factor = args[0], args[1], float(args[2])
    return multiply(grad, mask.to(torch.float64) * factor)


# ---------------------------------------------------------------------- max and argmax


@implements(aten.max.dim)
def _max_dim(func: Any, args: Any, kwargs: Any) -> Any:
    x, dim = args[0], args[1]
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if x.dim() == 0:  # torch accepts dim 0 or -1 of a scalar: the value itself, index 0
        return _copy_scalar(x), FPT(torch.zeros((), dtype=torch.int64), 0, torch.int64)
    values, onehot = A.max_with_onehot(x, dim)
    index = _onehot_index(onehot, dim, x.shape[dim])
    if not keepdim:
        values = V.shape_op(values, "squeeze.dim", dim)
        index = V.shape_op(index, "squeeze.dim", dim)
    vals = FPT(values, x.precision_bits, x.dtype)
    idx = FPT(index, 0, torch.int64)
    idx.cache = {"onehot": onehot, "dim": dim % x.dim()}
    return vals, idx


@implements(aten.scatter.src)
def _scatter(func: Any, args: Any, kwargs: Any) -> Any:
    """``base.scatter(dim, index, src)`` where ``index`` are the secret positions of a
    ``max``/``min`` over ``dim`` or of a sort (what autograd does to route their gradient;
    see :mod:`veil.mpc._ops_sort` for the latter): the one-hot
    of the positions times ``src``, plus ``base`` where the one-hot is 0. One product (or
    two when ``base`` is not public zeros), no position revealed."""
    base, dim, index, src = args
    if type(base) is FPT and base.dim() == 0 and type(src) is FPT:  # a scalar's only place
        return FPT(V.shape_op(child_of(src), "reshape", []), src.precision_bits, src.dtype)
    if type(index) is torch.Tensor:  # public positions: each party writes its share there
        return _scatter_public(base, dim, index, src)
    cache = getattr(index, "cache", None) if type(index) is FPT else None
    if cache and "perm" in cache and type(src) is FPT and type(base) is FPT:
        return scatter_through_permutation(base, dim, index, src)
    onehot = cache.get("onehot") if cache else None
    if onehot is None or type(src) is not FPT or type(base) is not FPT:
        raise NotImplementedError(
            f"{func}: only the gradient of max/min over a dim (their secret indices) is "
            "supported on a FixedPrecisionTensor"
        )
    if dim % base.dim() != cache["dim"] or tuple(base.shape) != tuple(onehot.shape):
        raise NotImplementedError(f"{func}: the indices come from a max/min over another shape")
    f = src.precision_bits
    spread = V.product(onehot, V.shape_op(child_of(src), "expand", list(onehot.shape)))
    b = child_of(base)
    if type(b) is torch.Tensor and not b.any():
        return FPT(spread, f, src.dtype)
    if base.precision_bits != f:
        raise NotImplementedError(f"{func}: base and src of different precisions")
    kept = V.product(V.sub(1, onehot), b)
    return FPT(V.add(kept, spread), f, src.dtype)


def _onehot_index(onehot: Any, dim: int, k: int) -> Any:
    shape = [1] * onehot.dim()
    shape[dim] = k
    positions = torch.arange(k, dtype=torch.int64).view(shape)
    return V.shape_op(V.mul_int(onehot, positions), "sum", [dim], True)


def _scatter_public(base: Any, dim: int, index: torch.Tensor, src: Any) -> FixedPrecisionTensor:
    """``base.scatter(dim, index, src)`` at public positions (``src`` a tensor or a number):
    local. Each party writes its share of ``src`` (party 0 a public value) there."""
    if not isinstance(src, torch.Tensor):
        src = torch.full(tuple(index.shape), float(src))
    return written_at(base, src, "add_at", ("put", dim, index))


@implements(aten.scatter.value)
def _scatter_value(func: Any, args: Any, kwargs: Any) -> Any:
    base, dim, index, value = args[:4]
    if type(index) is not torch.Tensor:
        raise NotImplementedError(f"{func}: secret indices")
    return _scatter_public(base, dim, index, value)


def _copy_scalar(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    return FPT(child_of(x), x.precision_bits, x.dtype)


@implements(aten.max.default, aten.amax)
def _max_all(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    if x.dim() == 0:  # a scalar's maximum over dim 0, -1 or all: itself
        return _copy_scalar(x)
    if func.overloadpacket is aten.amax:
        dims = args[1] if len(args) > 1 else kwargs.get("dim", [])
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        dims = list(range(x.dim())) if not dims else [d % x.dim() for d in dims]
    else:
        dims, keepdim = list(range(x.dim())), False
    out = x
    for d in sorted(dims, reverse=True):
        values, _ = A.max_with_onehot(out, d)
        out = FPT(
            values if keepdim else V.shape_op(values, "squeeze.dim", d), x.precision_bits, x.dtype
        )
    return out


@implements(aten.argmax)
def _argmax(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if dim is not None and x.dim() == 0:
        return FPT(torch.zeros((), dtype=torch.int64), 0, torch.int64)
    if dim is None:
        flat = FPT(V.shape_op(child_of(x), "reshape", [-1]), x.precision_bits, x.dtype)
        _, onehot = A.max_with_onehot(flat, 0)
        return FPT(
            V.shape_op(_onehot_index(onehot, 0, flat.shape[0]), "reshape", []), 0, torch.int64
        )
    _, onehot = A.max_with_onehot(x, dim)
    index = _onehot_index(onehot, dim, x.shape[dim])
    if not keepdim:
        index = V.shape_op(index, "squeeze.dim", dim)
    return FPT(index, 0, torch.int64)


__all__ = ["bilinear", "relu", "softmax_backward"]
