"""``torch.cdist`` on FixedPrecisionTensors (nearest neighbours, prototypes, contrastive
losses), forward and backward, for ``p = 2`` and ``p = 1``.

``p = 2``: ``d_ij = sqrt(relu(|x_i|^2 + |y_j|^2 - 2 x_i . y_j))``: the squares and the
product in one round, a ReLU (rounding can take a tiny distance below 0), and the
range-reduced square root (:func:`veil.mpc.approximations.sqrt`, down to 0 exactly). Its
gradient is ``x_i sum_j w_ij - sum_j w_ij y_j`` with ``w = g / d`` where ``d`` is above two
units in the last place and 0 elsewhere (torch's 0 at equal points): one comparison, one
reciprocal, one product for the mask, two products.

``p = 1``: ``d_ij = sum_k |x_ik - y_jk|`` (the differences' signs, one batch of
comparisons), and the gradient ``sum_j g_ij sign(x_ik - y_jk)``. Other ``p`` raise.

Accuracy (f = 16): the square root's, plus the rounding of the squared distance (a few
units) seen through the square root: near 0 that is up to about 7e-3 (``sqrt`` of three
units), as torch's own matrix-product path loses digits there in float32. So the gradient,
which divides by the distance, is accurate for distances above about 0.05 and at exactly
equal points (0, as torch), not for distinct points closer than that.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import approximations as A
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements

#: Distances at or below this count as 0 in the gradient (two units at 16 bits).
_ZERO = 2.0**-15


def _check(func: Any, x1: Any, x2: Any, p: float) -> None:
    if p not in (1.0, 2.0):
        raise NotImplementedError(f"{func}: p={p} (only 1 and 2 on a FixedPrecisionTensor)")
    if type(x1) is not FPT and type(x2) is not FPT:
        raise NotImplementedError(f"{func}: no fixed-point operand")


def _differences(x1: Any, x2: Any) -> Any:
    """``x1_i - x2_j`` for every pair: ``(..., n, m, d)``."""
    return x1.unsqueeze(-2) - x2.unsqueeze(-3)


@implements(aten._cdist_forward)
def _cdist(func: Any, args: Any, kwargs: Any) -> Any:
    x1, x2, p = args[0], args[1], float(args[2])
    _check(func, x1, x2, p)
    if p == 1.0:
        return _differences(x1, x2).abs().sum(-1)
    squares = (x1 * x1).sum(-1, keepdim=True) + (x2 * x2).sum(-1).unsqueeze(-2)
    return A.sqrt(torch.relu(squares - 2 * (x1 @ x2.transpose(-2, -1))))


@implements(aten._cdist_backward)
def _cdist_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, x1, x2, p, dist = args[0], args[1], args[2], float(args[3]), args[4]
    _check(func, x1, x2, p)
    if p == 1.0:
        return (_differences(x1, x2).sign() * grad.unsqueeze(-1)).sum(-2)
    weights = grad * A.reciprocal(dist, positive=True) * torch.gt(dist, _ZERO)
    return x1 * weights.sum(-1, keepdim=True) - weights @ x2


__all__: list[str] = []
