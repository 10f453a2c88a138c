"""aten handlers of FixedPrecisionTensor for convolutions: 1-D, 2-D and 3-D, plain and
transposed, grouped or not, forward and backward (each one ring product with a Beaver
triple of its own shape, so one round). 1-D ones run as 2-D ones over a height of 1."""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc._ops_fixed import _binary_add, child_of, reduce_sum
from veil.mpc._ops_nn import _pair, bilinear, ntuple
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


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


def _spatial(func: Any, x: Any) -> int:
    """The number of spatial dims of a 2-D or 3-D convolution's input."""
    if x.dim() not in (4, 5):
        raise NotImplementedError(
            f"{func}: only 1-D, 2-D and 3-D convolutions are supported on a FixedPrecisionTensor"
        )
    return x.dim() - 2


def _per_group(groups: int, a: Any, b: Any, kind: str, params: tuple[Any, ...]) -> Any:
    """Weight gradients, ``conv{d}_weight(a, b)`` per group (channel slices), stacked along
    the first dim: one product per group, queued together (one round)."""
    if groups == 1:
        return bilinear(a, b, kind, params)
    ca, cb = a.shape[1] // groups, b.shape[1] // groups
    return torch.cat(
        [
            bilinear(a[:, g * ca : (g + 1) * ca], b[:, g * cb : (g + 1) * cb], kind, params)
            for g in range(groups)
        ],
        0,
    )


@implements(aten.convolution)
def _convolution(func: Any, args: Any, kwargs: Any) -> Any:
    """1-D, 2-D and 3-D convolutions, plain and transposed, grouped or not: one ring product
    with the dealer's triple of the same shape (exact), then the bias."""
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if x.dim() == 3 and w.dim() == 3:
        x2, w2, s2, p2, d2, o2 = _lift_1d(x, w, stride, padding, dilation, output_padding)
        out = _convolution(func, (x2, w2, bias, s2, p2, d2, transposed, o2, groups), {})
        return out.squeeze(2)
    d = _spatial(func, x)
    stride, padding, dilation = ntuple(stride, d), ntuple(padding, d), ntuple(dilation, d)
    if transposed:
        params = (stride, padding, ntuple(output_padding, d), int(groups), dilation)
        out = bilinear(x, w, f"conv_transpose{d}d", params)
    else:
        out = bilinear(x, w, f"conv{d}d", (stride, padding, dilation, int(groups)))
    if bias is not None:
        shape = [1, -1] + [1] * d
        b = V.shape_op(child_of(bias), "view", shape) if type(bias) is FPT else None
        out = _binary_add(
            out,
            FPT(b, bias.precision_bits, bias.dtype) if b is not None else bias.view(shape),
            1,
            False,
        )
    return out


@implements(aten.convolution_backward)
def _convolution_backward(func: Any, args: Any, kwargs: Any) -> Any:
    """Input gradient: the adjoint convolution (transposed for a plain one, plain for a
    transposed one); weight gradient: ``conv{d}_weight`` of (input, output gradient), or of
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
    d = _spatial(func, x)
    stride, padding, dilation = ntuple(stride, d), ntuple(padding, d), ntuple(dilation, d)
    kernel = tuple(w.shape[2:])
    groups = int(groups)
    grad_input = grad_weight = grad_bias = None
    if mask[0]:
        if transposed:
            grad_input = bilinear(grad, w, f"conv{d}d", (stride, padding, dilation, groups))
        else:
            out_pad = tuple(
                x.shape[2 + i]
                - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                   + dilation[i] * (kernel[i] - 1) + 1)
                for i in range(d)
            )
            grad_input = bilinear(
                grad, w, f"conv_transpose{d}d", (stride, padding, out_pad, groups, dilation)
            )
    if mask[1]:
        params = (stride, padding, dilation, kernel)
        kind = f"conv{d}d_weight"
        grad_weight = (
            _per_group(groups, grad, x, kind, params)
            if transposed
            else _per_group(groups, x, grad, kind, params)
        )
    if mask[2]:
        grad_bias = reduce_sum(grad, [0, *range(2, 2 + d)])
    return grad_input, grad_weight, grad_bias


__all__: list[str] = []
