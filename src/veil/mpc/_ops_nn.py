"""aten handlers of FixedPrecisionTensor for neural networks: activations, convolutions,
pooling and losses, with their backward operators (so autograd runs them unchanged)."""

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
    scale,
)
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


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


@implements(aten.log_sigmoid)
def _log_sigmoid(func: Any, args: Any, kwargs: Any) -> Any:
    """``log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|))``: ``exp`` on [-384, 0] and ``log``
    on [1, 2], so any ``|x| <= 384`` (BCE with logits decomposes into it); absolute error
    below 1e-3."""
    x = args[0]
    r = relu(x)  # max(x, 0); min(x, 0) = x - max(x, 0)
    neg_abs = _binary_add(_binary_add(r, r, 1, False), x, 1, True)  # -|x| = x - 2 max(x, 0)
    neg_abs = FPT(V.neg(child_of(neg_abs)), x.precision_bits, x.dtype)
    soft = A.log(_binary_add(A.exp(neg_abs), 1.0, 1, False))
    return _binary_add(_binary_add(x, r, 1, True), soft, 1, True)


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
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim", [])
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(dims) != 1:
        raise NotImplementedError(f"{func} over {len(dims)} dims (one at a time is supported)")
    return A.logsumexp(x, dims[0], keepdim)


@implements(aten._log_softmax)
def _log_softmax(func: Any, args: Any, kwargs: Any) -> Any:
    return A.log_softmax(args[0], args[1])


@implements(aten._softmax_backward_data)
def _softmax_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, out, dim = args[0], args[1], args[2]
    inner = reduce_sum(multiply(grad, out), dim, True)
    return multiply(out, _binary_add(grad, inner, 1, True))


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
    cache = getattr(index, "cache", None) if type(index) is FPT else None
    if cache and "perm" in cache and type(src) is FPT and type(base) is FPT:
        from veil.mpc._ops_sort import scatter_through_permutation

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


@implements(aten.max.default, aten.amax)
def _max_all(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
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


# ---------------------------------------------------------------------- convolution


def _lift_1d(
    x: Any, w: Any, stride: Any, padding: Any, dilation: Any, output_padding: Any
) -> tuple[Any, ...]:
    """A 1-D convolution as a 2-D one over a height of 1."""
    return (
        x.unsqueeze(2),
        w.unsqueeze(2),
        [1, _pair(stride)[0]],
        [0, _pair(padding)[0]],
        [1, _pair(dilation)[0]],
        [0, _pair(output_padding)[0]],
    )


def _per_group(groups: int, a: Any, b: Any, params: tuple[Any, ...]) -> Any:
    """Weight gradients, ``conv2d_weight(a, b)`` per group (channel slices), stacked along
    the first dim: one product per group, queued together (one round)."""
    if groups == 1:
        return bilinear(a, b, "conv2d_weight", params)
    ca, cb = a.shape[1] // groups, b.shape[1] // groups
    return torch.cat(
        [
            bilinear(
                a[:, g * ca : (g + 1) * ca], b[:, g * cb : (g + 1) * cb], "conv2d_weight", params
            )
            for g in range(groups)
        ],
        0,
    )


@implements(aten.convolution)
def _convolution(func: Any, args: Any, kwargs: Any) -> Any:
    """1-D and 2-D convolutions, plain and transposed, grouped or not: one ring product with
    the dealer's triple of the same shape (exact), then the bias."""
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if x.dim() == 3 and w.dim() == 3:
        x2, w2, s2, p2, d2, o2 = _lift_1d(x, w, stride, padding, dilation, output_padding)
        out = _convolution(func, (x2, w2, bias, s2, p2, d2, transposed, o2, groups), {})
        return out.squeeze(2)
    if x.dim() != 4:
        raise NotImplementedError(
            f"{func}: only 1-D and 2-D convolutions are supported on a FixedPrecisionTensor"
        )
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if transposed:
        params = (stride, padding, _pair(output_padding), int(groups), dilation)
        out = bilinear(x, w, "conv_transpose2d", params)
    else:
        out = bilinear(x, w, "conv2d", (stride, padding, dilation, int(groups)))
    if bias is not None:
        b = V.shape_op(child_of(bias), "view", [1, -1, 1, 1]) if type(bias) is FPT else None
        out = _binary_add(
            out,
            FPT(b, bias.precision_bits, bias.dtype) if b is not None else bias.view(1, -1, 1, 1),
            1,
            False,
        )
    return out


@implements(aten.convolution_backward)
def _convolution_backward(func: Any, args: Any, kwargs: Any) -> Any:
    """Input gradient: the adjoint convolution (transposed for a plain one, plain for a
    transposed one); weight gradient: ``conv2d_weight`` of (input, output gradient), or of
    (output gradient, input) for a transposed convolution; bias: a sum. One round."""
    grad, x, w, _, stride, padding, dilation, transposed, output_padding, groups, mask = args
    if x.dim() == 3 and w.dim() == 3:
        x2, w2, s2, p2, d2, o2 = _lift_1d(x, w, stride, padding, dilation, output_padding)
        lifted = (grad.unsqueeze(2), x2, w2, None, s2, p2, d2, transposed, o2, groups, mask)
        gi, gw, gb = _convolution_backward(func, lifted, {})
        return (
            gi.squeeze(2) if gi is not None else None,
            gw.squeeze(2) if gw is not None else None,
            gb,
        )
    if x.dim() != 4:
        raise NotImplementedError(f"{func}: only 1-D and 2-D convolutions")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = w.shape[2], w.shape[3]
    groups = int(groups)
    grad_input = grad_weight = grad_bias = None
    if mask[0]:
        if transposed:
            grad_input = bilinear(grad, w, "conv2d", (stride, padding, dilation, groups))
        else:
            out_pad = tuple(
                x.shape[2 + i]
                - (
                    (grad.shape[2 + i] - 1) * stride[i]
                    - 2 * padding[i]
                    + dilation[i] * ((kh, kw)[i] - 1)
                    + 1
                )
                for i in range(2)
            )
            grad_input = bilinear(
                grad, w, "conv_transpose2d", (stride, padding, out_pad, groups, dilation)
            )
    if mask[1]:
        params = (stride, padding, dilation, (kh, kw))
        grad_weight = (
            _per_group(groups, grad, x, params)
            if transposed
            else _per_group(groups, x, grad, params)
        )
    if mask[2]:
        grad_bias = reduce_sum(grad, [0, 2, 3])
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------------- pooling


def _ones_kernel(channels: int, kh: int, kw: int) -> torch.Tensor:
    return torch.ones((channels, 1, kh, kw), dtype=torch.int64)


def _avg_args(args: Any, first: int) -> tuple[Any, ...]:
    """``(kernel, stride, padding, ceil_mode, count_include_pad, divisor)`` of avg_pool2d
    (``first``: the index of the kernel size among ``args``)."""
    kh, kw = _pair(args[first])
    rest = list(args[first + 1 :]) + [None] * 5
    stride = _pair(rest[0]) if rest[0] else (kh, kw)
    padding = _pair(rest[1]) if rest[1] is not None else (0, 0)
    ceil_mode = bool(rest[2]) if rest[2] is not None else False
    count_include_pad = rest[3] if rest[3] is not None else True
    return (kh, kw), stride, padding, ceil_mode, count_include_pad, rest[4]


def _avg_factor(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor: Any,
) -> tuple[tuple[int, int], torch.Tensor | float]:
    """The padding added after the input so that every window fits (ceil mode), and the
    public factor turning each window's sum into torch's average: ``1 / kh kw`` when it is
    the same everywhere, else one factor per output position (torch's own divisors, read
    from pooling a plaintext tensor of ones)."""
    extra = tuple(
        _pool_geometry(size[i], kernel[i], stride[i], padding[i], ceil_mode)[1] for i in range(2)
    )
    if divisor:
        return extra, 1.0 / divisor  # type: ignore[return-value]
    if not ceil_mode and (count_include_pad or padding == (0, 0)):
        return extra, 1.0 / (kernel[0] * kernel[1])  # type: ignore[return-value]
    ones = torch.ones(1, 1, *size, dtype=torch.float64)
    mean = torch.nn.functional.avg_pool2d(
        ones, kernel, stride, padding, ceil_mode, count_include_pad
    )
    real = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(ones, (0, extra[1], 0, extra[0])),
        kernel,
        stride,
        padding,
        False,
        True,
        1,
    )
    factor = torch.where(real > 0, mean / real.clamp(min=1), 0.0)[0, 0]
    return extra, factor  # type: ignore[return-value]


def _times_factor(child: Any, factor: Any, x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``child * factor`` for public factors in (0, 1], kept with 24 fractional bits (as
    :func:`scale` keeps a scalar's) and one truncation."""
    if isinstance(factor, float):
        return FPT(scale(child, factor), x.precision_bits, x.dtype)
    bits = 24
    m = torch.round(factor.double() * 2.0**bits).to(torch.int64)
    return FPT(V.truncate(V.mul_int(child, m), bits), x.precision_bits, x.dtype)


@implements(aten.avg_pool2d)
def _avg_pool2d(func: Any, args: Any, kwargs: Any) -> Any:
    """Average pooling: window sums (a convolution with a public kernel of ones, no
    round) times torch's divisors (public); ``ceil_mode`` pads the far side with zeros."""
    x = args[0]
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = _avg_args(args, 1)
    size = (x.shape[-2], x.shape[-1])
    extra, factor = _avg_factor(
        size, kernel, stride, padding, ceil_mode, count_include_pad, divisor
    )
    c = child_of(x)
    if any(extra):
        c = V.shape_op(c, "constant_pad_nd", [0, extra[1], 0, extra[0]], 0)
    ch = x.shape[1]
    total = V.product(c, _ones_kernel(ch, *kernel), "conv2d", (stride, padding, (1, 1), ch), 0)
    return _times_factor(total, factor, x)


@implements(aten.avg_pool2d_backward)
def _avg_pool2d_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, x = args[0], args[1]
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = _avg_args(args, 2)
    size = (x.shape[-2], x.shape[-1])
    extra, factor = _avg_factor(
        size, kernel, stride, padding, ceil_mode, count_include_pad, divisor
    )
    weighted = _times_factor(child_of(grad), factor, grad)
    full = (size[0] + extra[0], size[1] + extra[1])
    out_pad = tuple(
        full[i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + kernel[i])
        for i in range(2)
    )
    ch = x.shape[1]
    spread = V.product(
        child_of(weighted),
        _ones_kernel(ch, *kernel),
        "conv_transpose2d",
        (stride, padding, out_pad, ch, (1, 1)),
        0,
    )
    if any(extra):
        spread = V.shape_op(spread, "slice", -2, 0, size[0], 1)
        spread = V.shape_op(spread, "slice", -1, 0, size[1], 1)
    return FPT(spread, grad.precision_bits, grad.dtype)


class SecretIndices(torch.Tensor):
    """The "indices" output of a secure max pooling: an int64 placeholder of the output's
    shape that carries the shared one-hot of each window's maximum for the backward pass."""

    @staticmethod
    def __new__(cls, shape: torch.Size, onehot: Any, info: tuple[Any, ...]) -> SecretIndices:
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.int64, device="cpu")
        out.onehot = onehot
        out.info = info
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (aten.detach, aten.alias):
            x = args[0]
            return SecretIndices(x.shape, x.onehot, x.info)
        if func.overloadpacket in (aten.squeeze, aten.unsqueeze):
            # max_pool1d is max_pool2d over a height of 1, its indices squeezed after; the
            # backward gets the 2-D node's own indices, so the squeezed ones only carry shape
            x = args[0]
            shape = func(torch.empty(tuple(x.shape), device="meta"), *args[1:]).shape
            return SecretIndices(shape, x.onehot, x.info)
        raise NotImplementedError(f"{func}: the indices of a secure max pooling are secret")

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"SecretIndices(shape={tuple(self.shape)})"


#: Ring value of the padding of a max pooling: below every value the comparisons order
#: exactly (they need differences below 2^62, so inputs with ``|x| < 2^61`` ring units,
#: ``2^45`` at 16 fractional bits), so a window's maximum is never padding.
_POOL_PAD = -(1 << 61)


def _pool_geometry(size: int, k: int, stride: int, pad: int, ceil_mode: bool) -> tuple[int, int]:
    """``(outputs, extra)`` along one axis: torch's output size, and the padding to add
    after the input beyond ``pad`` so that every window lies inside the padded axis."""
    span = size + 2 * pad - k
    if span < 0:
        raise ValueError(f"max pooling window {k} is larger than the padded input {size + 2 * pad}")
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # torch: the last window must start inside the input or the left padding
    return out, max(0, (out - 1) * stride + k - (size + 2 * pad))


def _windows(c: Any, kh: int, kw: int, stride: tuple[int, int]) -> Any:
    c = V.shape_op(c, "unfold", 2, kh, stride[0])
    c = V.shape_op(c, "unfold", 3, kw, stride[1])  # (N, C, Ho, Wo, kh, kw)
    n, ch, ho, wo = c.shape[:4]
    return V.shape_op(c, "reshape", [n, ch, ho, wo, kh * kw])


@implements(aten.max_pool2d_with_indices)
def _max_pool2d(func: Any, args: Any, kwargs: Any) -> Any:
    """Max pooling as a tournament over each window (:func:`approximations.max_with_onehot`).
    Padding is a public ``-2^61`` (ring units), so values need ``|x| < 2^61`` units, the
    comparisons' own range; ``ceil_mode`` pads the far side the same way."""
    x = args[0]
    kh, kw = _pair(args[1])
    stride = _pair(args[2]) if len(args) > 2 and args[2] else (kh, kw)
    padding = _pair(args[3]) if len(args) > 3 else (0, 0)
    dilation = _pair(args[4]) if len(args) > 4 else (1, 1)
    ceil_mode = args[5] if len(args) > 5 else False
    if dilation != (1, 1):
        raise NotImplementedError(f"{func}: dilation {dilation} (only 1 is supported)")
    if padding[0] * 2 > kh or padding[1] * 2 > kw:
        raise ValueError(f"{func}: padding {padding} should be at most half the kernel size")
    h, w = x.shape[-2:]
    _, extra_h = _pool_geometry(h, kh, stride[0], padding[0], ceil_mode)
    _, extra_w = _pool_geometry(w, kw, stride[1], padding[1], ceil_mode)
    pads = [padding[1], padding[1] + extra_w, padding[0], padding[0] + extra_h]
    c = child_of(x)
    if any(pads):
        c = V.shape_op(c, "constant_pad_nd", pads, 0)
        border = torch.full(tuple(c.shape), _POOL_PAD, dtype=torch.int64)
        border[..., padding[0] : padding[0] + h, padding[1] : padding[1] + w] = 0
        c = V.add(c, border)
    padded = tuple(c.shape)
    win = FPT(_windows(c, kh, kw, stride), x.precision_bits, x.dtype)
    values, onehot = A.max_with_onehot(win, -1)
    values = V.shape_op(values, "squeeze.dim", -1)
    out = FPT(values, x.precision_bits, x.dtype)
    info = (kh, kw, stride, padded, (padding[0], padding[1], h, w))
    return out, SecretIndices(out.shape, onehot, info)


@implements(aten.max_pool2d_with_indices_backward)
def _max_pool2d_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, indices = args[0], args[-1]
    if type(indices) is not SecretIndices:
        raise NotImplementedError(f"{func} without the indices of a secure max pooling")
    kh, kw, stride, padded, (top, left, h, w) = indices.info
    contrib = V.product(V.shape_op(child_of(grad), "unsqueeze", -1), indices.onehot)
    out = V.shape_op(contrib, "fold_windows", kh, kw, list(stride), list(padded))
    if tuple(padded[-2:]) != (h, w):
        out = V.shape_op(out, "slice", -2, top, top + h, 1)
        out = V.shape_op(out, "slice", -1, left, left + w, 1)
    return FPT(out, grad.precision_bits, grad.dtype)


# ---------------------------------------------------------------------- losses

_MEAN, _SUM = 1, 2


@implements(aten.mse_loss)
def _mse_loss(func: Any, args: Any, kwargs: Any) -> Any:
    x, target = args[0], args[1]
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", _MEAN)
    diff = _binary_add(x, target, 1, True)
    sq = multiply(diff, diff)
    if reduction == _MEAN:
        total = reduce_sum(sq)
        return FPT(scale(total.child, 1.0 / diff.numel()), total.precision_bits, total.dtype)
    if reduction == _SUM:
        return reduce_sum(sq)
    return sq


def _public_scalar(t: Any) -> float | None:
    """The value of a public one-element fixed-point tensor (autograd's seed), else None."""
    if type(t) is FPT and type(t.child) is torch.Tensor and t.child.numel() == 1:
        return float(t.float_precision().reshape(()))
    if type(t) is torch.Tensor and t.numel() == 1:
        return float(t.reshape(()))
    return None


@implements(aten.mse_loss_backward)
def _mse_loss_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, x, target, reduction = args[0], args[1], args[2], args[3]
    diff = _binary_add(x, target, 1, True)
    factor = 2.0 / diff.numel() if reduction == _MEAN else 2.0
    g = _public_scalar(grad)
    if g is not None:
        return FPT(scale(diff.child, factor * g), diff.precision_bits, diff.dtype)
    return multiply(multiply(diff, grad), factor)


@implements(aten.nll_loss_forward)
def _nll_loss_forward(func: Any, args: Any, kwargs: Any) -> Any:
    x, target, weight, reduction, ignore_index = args
    if x.dim() != 2 or type(target) is not torch.Tensor or type(weight) is FPT:
        raise NotImplementedError(
            f"{func}: only 2-D inputs, public class targets and public class weights"
        )
    valid = target != ignore_index
    rows = torch.arange(x.shape[0])[valid]
    picked = V.shape_op(child_of(x), "index", [rows, target[valid]])
    f = x.precision_bits
    if weight is None:
        total = V.neg(V.shape_op(picked, "sum", [0], False))
        count = float(valid.sum())
    else:  # public class weights: -sum w[y] x[y] / sum w[y], the weights in 24 bits
        w = weight.double()[target[valid]]
        m = torch.round(w * 2.0**24).to(torch.int64)
        total = V.truncate(V.neg(V.shape_op(V.mul_int(picked, m), "sum", [0], False)), 24)
        count = float(w.sum())
    if reduction == _MEAN:
        total = scale(total, 1.0 / count) if count else V.mul_int(total, 0)
    elif reduction != _SUM:
        if weight is not None:
            raise NotImplementedError(f"{func}: class weights with reduction='none'")
        full = V.neg(
            V.shape_op(child_of(x), "index", [torch.arange(x.shape[0]), target.clamp(min=0)])
        )
        full = V.mul_int(full, valid.to(torch.int64))
        return FPT(full, f, x.dtype), torch.tensor(0.0)
    return FPT(total, f, x.dtype), torch.tensor(count)


@implements(aten.nll_loss_backward)
def _nll_loss_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, x, target, weight, reduction, ignore_index, _ = args
    if weight is not None:
        return _weighted_nll_backward(grad, x, target, weight, reduction, ignore_index)
    valid = (target != ignore_index).to(torch.int64)
    onehot = torch.zeros(tuple(x.shape), dtype=torch.int64)
    onehot[torch.arange(x.shape[0]), target.clamp(min=0)] = 1
    onehot = -(onehot * valid.unsqueeze(1))
    count = max(int(valid.sum()), 1)
    g = _public_scalar(grad)
    f = x.precision_bits
    if g is not None and reduction in (_MEAN, _SUM):
        factor = g / count if reduction == _MEAN else g
        child = torch.round(onehot.double() * factor * 2.0**f).to(torch.int64)
        return FPT(child, f, x.dtype)
    if reduction == _MEAN:
        gg = child_of(multiply(grad, 1.0 / count))
    elif reduction == _SUM:
        gg = child_of(grad)
    else:
        gg = V.shape_op(child_of(grad), "unsqueeze", 1)
    gg = V.shape_op(gg, "expand", list(x.shape))
    return FPT(V.mul_int(gg, onehot), grad.precision_bits, grad.dtype)


def _weighted_nll_backward(
    grad: Any, x: Any, target: torch.Tensor, weight: torch.Tensor, reduction: int, ignore: int
) -> FixedPrecisionTensor:
    """NLL's input gradient with public class weights: ``-w[y] g`` at each target (divided
    by the total weight for the mean), the public coefficients kept with 24 bits."""
    if reduction not in (_MEAN, _SUM):
        raise NotImplementedError("nll_loss_backward: class weights with reduction='none'")
    valid = target != ignore
    per_row = weight.double()[target.clamp(min=0)] * valid
    total = float(per_row.sum()) if reduction == _MEAN else 1.0
    coeff = torch.zeros(tuple(x.shape), dtype=torch.float64)
    coeff[torch.arange(x.shape[0]), target.clamp(min=0)] = -per_row / (total or 1.0)
    f = x.precision_bits
    g = _public_scalar(grad)
    if g is not None:
        return FPT(torch.round(coeff * g * 2.0**f).to(torch.int64), f, x.dtype)
    gg = V.shape_op(child_of(grad), "expand", list(x.shape))
    m = torch.round(coeff * 2.0**24).to(torch.int64)
    return FPT(V.truncate(V.mul_int(gg, m), 24), grad.precision_bits, grad.dtype)


__all__ = ["SecretIndices", "bilinear", "relu"]
