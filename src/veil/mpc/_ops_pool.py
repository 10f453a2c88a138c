"""aten handlers of FixedPrecisionTensor for 2-D and 3-D pooling (batched or not; 1-D runs
as 2-D): average pooling (window sums by a
public kernel of ones, times torch's divisors) and max pooling (a tournament of exact
comparisons per window, with secret indices for the backward)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from veil.mpc import _ragged as R
from veil.mpc import _values as V
from veil.mpc import approximations as A
from veil.mpc._ops_fixed import child_of, scale, scale_each
from veil.mpc._ops_nn import ntuple
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


def _ones_kernel(channels: int, kernel: tuple[int, ...]) -> torch.Tensor:
    return torch.ones((channels, 1, *kernel), dtype=torch.int64)


def _far_pads(extra: tuple[int, ...], before: tuple[int, ...] = ()) -> list[int]:
    """``constant_pad_nd``'s list (last dim first) adding ``before[i]`` before and
    ``before[i] + extra[i]`` after each spatial dim ``i``."""
    before = before or (0,) * len(extra)
    pads: list[int] = []
    for b, e in zip(reversed(before), reversed(extra)):
        pads += [b, b + e]
    return pads


def _avg_args(args: Any, first: int, d: int) -> tuple[Any, ...]:
    """``(kernel, stride, padding, ceil_mode, count_include_pad, divisor)`` of avg_pool2d or
    avg_pool3d (``first``: the index of the kernel size among ``args``)."""
    kernel = ntuple(args[first], d)
    rest = list(args[first + 1 :]) + [None] * 5
    stride = ntuple(rest[0], d) if rest[0] else kernel
    padding = ntuple(rest[1], d) if rest[1] is not None else (0,) * d
    ceil_mode = bool(rest[2]) if rest[2] is not None else False
    count_include_pad = rest[3] if rest[3] is not None else True
    return kernel, stride, padding, ceil_mode, count_include_pad, rest[4]


def _avg_factor(
    size: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor: Any,
) -> tuple[tuple[int, ...], torch.Tensor | float]:
    """The padding added after the input so that every window fits (ceil mode), and the
    public factor turning each window's sum into torch's average: ``1 / prod(kernel)`` when
    it is the same everywhere, else one factor per output position (torch's own divisors,
    read from pooling a plaintext tensor of ones)."""
    d = len(size)
    extra = tuple(
        _pool_geometry(size[i], kernel[i], stride[i], padding[i], ceil_mode)[1] for i in range(d)
    )
    if divisor:
        return extra, 1.0 / divisor  # type: ignore[return-value]
    if not ceil_mode and (count_include_pad or not any(padding)):
        return extra, 1.0 / math.prod(kernel)  # type: ignore[return-value]
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    ones = torch.ones(1, 1, *size, dtype=torch.float64)
    mean = pool(ones, kernel, stride, padding, ceil_mode, count_include_pad)
    real = pool(F.pad(ones, _far_pads(extra)), kernel, stride, padding, False, True, 1)
    factor = torch.where(real > 0, mean / real.clamp(min=1), 0.0)[0, 0]
    return extra, factor  # type: ignore[return-value]


def _times_factor(child: Any, factor: Any, x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``child * factor`` for public factors in (0, 1], kept with 24 fractional bits (as
    :func:`scale` keeps a scalar's) and one truncation."""
    if isinstance(factor, float):
        return FPT(scale(child, factor), x.precision_bits, x.dtype)
    return FPT(scale_each(child, factor), x.precision_bits, x.dtype)


def _spatial(func: Any, x: Any) -> int:
    """2 or 3: the spatial dims of ``func`` (avg_pool2d, max_pool3d_with_indices, ...)."""
    d = 3 if "pool3d" in str(func) else 2
    if x.dim() < d + 1:
        raise NotImplementedError(f"{func} needs a {d + 1}-D or {d + 2}-D input")
    return d


@implements(aten.avg_pool2d, aten.avg_pool3d)
def _avg_pool(func: Any, args: Any, kwargs: Any) -> Any:
    """Average pooling: window sums (a convolution with a public kernel of ones, no
    round) times torch's divisors (public); ``ceil_mode`` pads the far side with zeros."""
    x = args[0]
    d = _spatial(func, x)
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = _avg_args(args, 1, d)
    size = tuple(x.shape[-d:])
    extra, factor = _avg_factor(
        size, kernel, stride, padding, ceil_mode, count_include_pad, divisor
    )
    c = child_of(x)
    batched = x.dim() == d + 2
    if not batched:
        c = V.shape_op(c, "unsqueeze", 0)
    if any(extra):
        c = V.shape_op(c, "constant_pad_nd", _far_pads(extra), 0)
    ch = c.shape[1]
    params = (stride, padding, (1,) * d, ch)
    total = V.product(c, _ones_kernel(ch, kernel), f"conv{d}d", params, 0)
    if not batched:
        total = V.shape_op(total, "squeeze.dim", 0)
    return _times_factor(total, factor, x)


@implements(aten.avg_pool2d_backward, aten.avg_pool3d_backward)
def _avg_pool_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, x = args[0], args[1]
    d = _spatial(func, x)
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = _avg_args(args, 2, d)
    size = tuple(x.shape[-d:])
    extra, factor = _avg_factor(
        size, kernel, stride, padding, ceil_mode, count_include_pad, divisor
    )
    weighted = child_of(_times_factor(child_of(grad), factor, grad))
    batched = x.dim() == d + 2
    if not batched:
        weighted = V.shape_op(weighted, "unsqueeze", 0)
    full = tuple(size[i] + extra[i] for i in range(d))
    out_pad = tuple(
        full[i] - ((weighted.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + kernel[i])
        for i in range(d)
    )
    ch = weighted.shape[1]
    spread = V.product(
        weighted,
        _ones_kernel(ch, kernel),
        f"conv_transpose{d}d",
        (stride, padding, out_pad, ch, (1,) * d),
        0,
    )
    for i in range(d):
        if extra[i]:
            spread = V.shape_op(spread, "slice", i - d, 0, size[i], 1)
    if not batched:
        spread = V.shape_op(spread, "squeeze.dim", 0)
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


def _windows(
    c: Any, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> Any:
    """The pooling windows of ``c`` (N, C, *spatial): (N, C, *outputs, prod(kernel)); a
    dilated window spans ``dilation * (kernel - 1) + 1`` places and keeps every
    ``dilation``-th."""
    d = len(kernel)
    for i in range(d):
        c = V.shape_op(c, "unfold", 2 + i, _span(kernel[i], dilation[i]), stride[i])
    for i in range(d):
        if dilation[i] != 1:
            c = V.shape_op(c, "slice", i - d, 0, _span(kernel[i], dilation[i]), dilation[i])
    return V.shape_op(c, "reshape", [*c.shape[: 2 + d], math.prod(kernel)])


def _span(kernel: int, dilation: int) -> int:
    """The places a window of ``kernel`` elements ``dilation`` apart covers."""
    return dilation * (kernel - 1) + 1


def _check_taps(func: Any, size: int, k: int, stride: int, pad: int, dilation: int,
                ceil_mode: bool) -> None:
    """Raise if a dilated window along an axis reads padding only: torch's maximum there is
    -inf, which fixed point cannot hold."""
    outs, _ = _pool_geometry(size, _span(k, dilation), stride, pad, ceil_mode)
    taps = torch.arange(outs)[:, None] * stride + torch.arange(k) * dilation - pad
    if not bool(((taps >= 0) & (taps < size)).any(1).all()):
        raise ValueError(
            f"{func}: with dilation {dilation} and padding {pad}, a window over an axis of "
            f"{size} reads padding only (torch gives -inf there, which fixed point cannot hold)"
        )


@implements(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)
def _max_pool(func: Any, args: Any, kwargs: Any) -> Any:
    """Max pooling as a tournament over each window (:func:`approximations.max_with_onehot`).
    Padding is a public ``-2^61`` (ring units), so values need ``|x| < 2^61`` units, the
    comparisons' own range; ``ceil_mode`` pads the far side the same way."""
    x = args[0]
    d = _spatial(func, x)
    kernel = ntuple(args[1], d)
    stride = ntuple(args[2], d) if len(args) > 2 and args[2] else kernel
    padding = ntuple(args[3], d) if len(args) > 3 else (0,) * d
    dilation = ntuple(args[4], d) if len(args) > 4 else (1,) * d
    ceil_mode = args[5] if len(args) > 5 else False
    if any(type(v) is not int or v < 1 for v in dilation):
        raise ValueError(f"{func}: dilation {dilation} should be positive integers")
    if any(p * 2 > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{func}: padding {padding} should be at most half the kernel size")
    size = tuple(x.shape[-d:])
    spans = tuple(_span(k, v) for k, v in zip(kernel, dilation))
    extra = tuple(
        _pool_geometry(size[i], spans[i], stride[i], padding[i], ceil_mode)[1] for i in range(d)
    )
    for i in range(d):
        _check_taps(func, size[i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode)
    c = child_of(x)
    batched = x.dim() == d + 2
    if not batched:
        c = V.shape_op(c, "unsqueeze", 0)
    if any(padding) or any(extra):
        c = V.shape_op(c, "constant_pad_nd", _far_pads(extra, padding), 0)
        border = torch.full(tuple(c.shape), R.PAD, dtype=torch.int64)  # never a maximum
        border[(..., *(slice(p, p + n) for p, n in zip(padding, size)))] = 0
        c = V.add(c, border)
    padded = tuple(c.shape[2:])
    win = FPT(_windows(c, kernel, stride, dilation), x.precision_bits, x.dtype)
    values, onehot = A.max_with_onehot(win, -1)
    values = V.shape_op(values, "squeeze.dim", -1)
    if not batched:
        values = V.shape_op(values, "squeeze.dim", 0)
    out = FPT(values, x.precision_bits, x.dtype)
    info = (kernel, stride, padded, padding, size, batched, dilation)
    return out, SecretIndices(out.shape, onehot, info)


@implements(aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward)
def _max_pool_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, indices = args[0], args[-1]
    if type(indices) is not SecretIndices:
        raise NotImplementedError(f"{func} without the indices of a secure max pooling")
    kernel, stride, padded, before, size, batched, dilation = indices.info
    g = child_of(grad)
    if not batched:
        g = V.shape_op(g, "unsqueeze", 0)
    contrib = V.product(V.shape_op(g, "unsqueeze", -1), indices.onehot)
    out = V.shape_op(
        contrib, "fold_windows", list(kernel), list(stride), list(padded), list(dilation)
    )
    d = len(kernel)
    for i in range(d):
        if padded[i] != size[i]:
            out = V.shape_op(out, "slice", i - d, before[i], before[i] + size[i], 1)
    if not batched:
        out = V.shape_op(out, "squeeze.dim", 0)
    return FPT(out, grad.precision_bits, grad.dtype)


@implements(aten.adaptive_max_pool2d, aten.adaptive_max_pool3d)
def _adaptive_max_pool(func: Any, args: Any, kwargs: Any) -> Any:
    """Adaptive max pooling. When the output size divides the input's (global max pooling,
    an output of 1, always does) it is max pooling with kernel = stride = input / output;
    otherwise torch's windows (output ``o`` of ``m`` along an axis of ``n`` covers
    ``[floor(o n / m), ceil((o + 1) n / m))``) differ in size and run as a maximum over
    ragged windows (:mod:`veil.mpc._ragged`)."""
    x, size = args[0], args[1]
    d = 3 if "pool3d" in str(func) else 2
    size = ntuple(size, d)
    spatial = tuple(x.shape[-d:])
    size = tuple(n if o is None else o for o, n in zip(size, spatial))
    if any(type(o) is not int or o <= 0 for o in size) or x.dim() not in (d + 1, d + 2):
        raise ValueError(f"{func}: output size {size} for an input of shape {tuple(x.shape)}")
    if all(n % o == 0 for o, n in zip(size, spatial)):
        kernel = tuple(n // o for o, n in zip(size, spatial))
        pool = aten.max_pool3d_with_indices if d == 3 else aten.max_pool2d_with_indices
        return _max_pool(pool.default, (x, list(kernel), list(kernel)), {})
    table = _adaptive_table(size, spatial)
    lead = tuple(x.shape[:-d])
    flat = FPT(V.shape_op(child_of(x), "reshape", [*lead, math.prod(spatial)]),
               x.precision_bits, x.dtype)
    values, onehot = R.group_max(flat, table)
    out = FPT(V.shape_op(values, "reshape", [*lead, *size]), x.precision_bits, x.dtype)
    return out, SecretIndices(out.shape, onehot, ("ragged", table, spatial))


def _adaptive_table(size: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    """The ragged-window table of an adaptive pooling: row ``o`` (outputs in row-major
    order) lists the flat input positions of its window in row-major order, ``-1`` where
    the window is smaller than the largest one (torch's loop order, so ties go where
    torch's do)."""
    d = len(size)
    total = torch.zeros((), dtype=torch.int64)
    valid = torch.ones((), dtype=torch.bool)
    stride = math.prod(spatial)
    for i, (m, n) in enumerate(zip(size, spatial)):
        stride //= n
        o = torch.arange(m)
        axis = R.positions((o * n) // m, -((-(o + 1) * n) // m))  # (m, K_i)
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = axis.shape
        axis = axis.view(shape)
        total = total + axis * stride
        valid = valid & (axis >= 0)
    return torch.where(valid, total, -1).reshape(math.prod(size), -1)


@implements(aten.adaptive_max_pool2d_backward, aten.adaptive_max_pool3d_backward)
def _adaptive_max_pool_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, _, indices = args
    if type(indices) is SecretIndices and indices.info[0] == "ragged":
        _, table, spatial = indices.info
        lead = tuple(grad.shape[: grad.dim() - len(spatial)])
        g = V.shape_op(child_of(grad), "reshape", [*lead, table.shape[0]])
        out = R.spread(g, indices.onehot, table, math.prod(spatial))
        return FPT(V.shape_op(out, "reshape", [*lead, *spatial]), grad.precision_bits,
                   grad.dtype)
    return _max_pool_backward(func, (grad, indices), {})


__all__ = ["SecretIndices"]
