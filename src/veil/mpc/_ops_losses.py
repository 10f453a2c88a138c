"""aten handlers of FixedPrecisionTensor for losses: MSE and NLL (hence cross-entropy),
forward and backward; the others run as torch's decompositions over these and the
activations."""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc._ops_fixed import (
    FACTOR_BITS,
    _binary_add,
    child_of,
    factor_ints,
    multiply,
    reduce_sum,
    scale,
    scale_each,
)
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


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
    if x.dim() == 1:  # one sample's scores: a batch of one
        out, total = _nll_loss_forward(
            func, (x.unsqueeze(0), target.reshape(1), weight, reduction, ignore_index), {}
        )
        return (out.reshape(()) if reduction not in (_MEAN, _SUM) else out), total
    if x.dim() != 2 or type(target) is not torch.Tensor or type(weight) is FPT:
        raise NotImplementedError(
            f"{func}: only public class targets and public class weights"
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
        weighted = V.shape_op(V.mul_int(picked, factor_ints(w)), "sum", [0], False)
        total = V.truncate(V.neg(weighted), FACTOR_BITS)  # one truncation for the sum
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
    grad, x, target, weight, reduction, ignore_index, total = args
    if x.dim() == 1:  # one sample's scores: as a batch of one
        one = (grad.reshape(1) if reduction not in (_MEAN, _SUM) else grad, x.unsqueeze(0))
        rows = _nll_loss_backward(
            func, (*one, target.reshape(1), weight, reduction, ignore_index, total), {}
        )
        return rows.reshape(tuple(x.shape))
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


def _classes_last(x: Any) -> Any:
    """``(N, C, H, W)`` scores as ``(N H W, C)`` rows, one per position."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@implements(aten.nll_loss2d_forward)
def _nll_loss2d_forward(func: Any, args: Any, kwargs: Any) -> Any:
    """NLL over positions (segmentation; torch also sends K-dim inputs here, reshaped to
    4-D): the 2-D protocol on one row per position."""
    x, target, weight, reduction, ignore_index = args
    out, total = _nll_loss_forward(
        func, (_classes_last(x), target.reshape(-1), weight, reduction, ignore_index), {}
    )
    if reduction not in (_MEAN, _SUM):
        out = out.reshape(tuple(target.shape))
    return out, total


@implements(aten.nll_loss2d_backward)
def _nll_loss2d_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, x, target, weight, reduction, ignore_index, total = args
    if reduction not in (_MEAN, _SUM):
        grad = grad.reshape(-1)
    rows = _nll_loss_backward(
        func,
        (grad, _classes_last(x), target.reshape(-1), weight, reduction, ignore_index, total),
        {},
    )
    n, c, h, w = x.shape
    return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)


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
    return FPT(scale_each(gg, coeff), grad.precision_bits, grad.dtype)


__all__: list[str] = []
