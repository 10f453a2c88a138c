"""aten handlers of FixedPrecisionTensor for pooling: average pooling (window sums by a
public kernel of ones, times torch's divisors) and max pooling (a tournament of exact
comparisons per window, with secret indices for the backward)."""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import approximations as A
from veil.mpc._ops_fixed import child_of, scale, scale_each
from veil.mpc._ops_nn import _pair
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


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
    return FPT(scale_each(child, factor), x.precision_bits, x.dtype)


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


__all__ = ["SecretIndices"]
