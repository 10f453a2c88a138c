"""Linear combinations and accumulated products on FixedPrecisionTensors: ``lerp`` (and
``lerp_``, the exponential moving average of weights: ``ema.lerp_(w, 1 - decay)``),
``addbmm``, ``addr`` and ``_trilinear`` (``nn.Bilinear``).

Each is the composition torch documents, in veil's own products: a public weight costs one
truncation (``lerp``'s ``start + w (end - start)``), a shared one a Beaver product; the
accumulated products are one Beaver matrix product (``addbmm`` concatenates the batch
along the inner dimension, so the sum is inside the product, one truncation) or an outer
product, then the scaled addition.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc._ops_fixed import _binary_add, _inplace, matmul, multiply
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


def lerp(start: Any, end: Any, weight: Any) -> FixedPrecisionTensor:
    """``start + weight * (end - start)``."""
    diff = _binary_add(end, start, 1, True)
    if isinstance(weight, (int, float)) and type(start) is FPT:
        return _binary_add(start, diff, weight, False)  # one truncation
    return _binary_add(start, multiply(diff, weight), 1, False)


@implements(aten.lerp.Scalar, aten.lerp.Tensor)
def _lerp(func: Any, args: Any, kwargs: Any) -> Any:
    return lerp(args[0], args[1], args[2] if len(args) > 2 else kwargs["weight"])


@implements(aten.lerp_.Scalar, aten.lerp_.Tensor)
def _lerp_(func: Any, args: Any, kwargs: Any) -> Any:
    out = lerp(args[0], args[1], args[2] if len(args) > 2 else kwargs["weight"])
    return _inplace(out, args[0])


def _scaled_sum(base: Any, product: Any, beta: Any, alpha: Any) -> FixedPrecisionTensor:
    """``beta * base + alpha * product``, as torch's ``add*`` ops (``beta = 0`` ignores
    ``base``)."""
    if alpha != 1:
        product = multiply(product, alpha)
    if beta == 0:
        return product
    if beta != 1:
        base = multiply(base, beta) if type(base) is FPT else base * beta
    return _binary_add(base, product, 1, False)


@implements(aten.addbmm)
def _addbmm(func: Any, args: Any, kwargs: Any) -> Any:
    """``beta * input + alpha * sum_b batch1[b] @ batch2[b]``: the batches joined along the
    inner dimension (``[b1_0 .. b1_B] @ [b2_0; ..; b2_B]``), one product."""
    base, b1, b2 = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    batch, n, k = b1.shape
    left = b1.permute(1, 0, 2).reshape(n, batch * k)
    right = b2.reshape(batch * k, b2.shape[-1])
    return _scaled_sum(base, matmul(left, right), beta, alpha)


@implements(aten.addr)
def _addr(func: Any, args: Any, kwargs: Any) -> Any:
    """``beta * input + alpha * outer(vec1, vec2)``: the outer product as an (n, 1) @ (1, m)
    product."""
    base, v1, v2 = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    return _scaled_sum(base, matmul(v1.reshape(-1, 1), v2.reshape(1, -1)), beta, alpha)


@implements(aten._trilinear)
def _trilinear(func: Any, args: Any, kwargs: Any) -> Any:
    """``nn.Bilinear``'s ``x1^T W x2`` (and its gradients, the same op): each operand gets
    size-1 dims at its ``expand`` positions, the three are multiplied with broadcasting
    (two Beaver products; a public operand costs a truncation only) and summed over
    ``sumdim``."""
    i1, i2, i3, e1, e2, e3, sumdim = args[:7]
    parts = []
    for t, expand in ((i1, e1), (i2, e2), (i3, e3)):
        for d in sorted(expand):
            t = t.unsqueeze(d)
        parts.append(t)
    out = multiply(multiply(parts[0], parts[1]), parts[2])
    return out.sum(list(sumdim)) if len(sumdim) else out


__all__ = ["lerp"]
