"""aten handlers of FixedPrecisionTensor for statistics: variance and standard deviation
(which ``layer_norm`` and ``batch_norm`` decompose into), and minima as maxima of ``-x``.

Each is a composition of protocols documented elsewhere, so its accuracy is theirs:
``var`` is a mean of squares of ``x - mean(x)`` (products truncate, error of a few units
of ``2^-f``), ``std`` adds :func:`veil.mpc.approximations.sqrt`, and ``min``/``argmin``
are exact comparisons (:mod:`veil.mpc.protocols.comparison`) on the negated values.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import approximations as A
from veil.mpc._ops_fixed import (
    _binary_add,
    _dims,
    child_of,
    count,
    mean,
    multiply,
    negate,
    reduce_sum,
    scale,
)
from veil.mpc._ops_nn import _argmax, _max_all, _max_dim
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


def _correction(func: Any, args: Any, kwargs: Any) -> tuple[Any, float, bool]:
    """``(dim, correction, keepdim)`` of any ``var``/``std``/``var_mean`` overload."""
    name = func._overloadname
    if name == "default":  # var(x, unbiased=True)
        unbiased = args[1] if len(args) > 1 else kwargs.get("unbiased", True)
        return None, float(unbiased), False
    if name == "dim":  # var(x, dim, unbiased=True, keepdim=False)
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        unbiased = args[2] if len(args) > 2 else kwargs.get("unbiased", True)
        keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
        return dim, float(unbiased), keepdim
    if name == "correction":  # var(x, dim=None, *, correction=None, keepdim=False)
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        correction = kwargs.get("correction")
        keepdim = kwargs.get("keepdim", False)
        return dim, 1.0 if correction is None else float(correction), keepdim
    raise NotImplementedError(f"{func} is not supported on a FixedPrecisionTensor")


def variance(x: FixedPrecisionTensor, dim: Any, correction: float, keepdim: bool) -> Any:
    """``sum((x - mean(x))^2) / (N - correction)`` over ``dim``, and the mean (kept dims)."""
    dims = _dims(x, dim)
    n = count(x, dims)
    if n - correction <= 0:
        raise ValueError(
            f"variance over {n} values with correction {correction}: no degrees of freedom"
        )
    centre = mean(x, dims, True)
    dev = _binary_add(x, centre, 1, True)
    total = reduce_sum(multiply(dev, dev), dims, keepdim)
    var = FPT(scale(child_of(total), 1.0 / (n - correction)), x.precision_bits, x.dtype)
    if not keepdim:
        for d in sorted((d % x.dim() for d in dims), reverse=True):
            centre = FPT(V.shape_op(child_of(centre), "squeeze.dim", d), x.precision_bits, x.dtype)
    return var, centre


@implements(aten.var)
def _var(func: Any, args: Any, kwargs: Any) -> Any:
    return variance(args[0], *_correction(func, args, kwargs))[0]


@implements(aten.std)
def _std(func: Any, args: Any, kwargs: Any) -> Any:
    return A.sqrt(variance(args[0], *_correction(func, args, kwargs))[0])


@implements(aten.var_mean)
def _var_mean(func: Any, args: Any, kwargs: Any) -> Any:
    return variance(args[0], *_correction(func, args, kwargs))


@implements(aten.min.dim)
def _min_dim(func: Any, args: Any, kwargs: Any) -> Any:
    values, index = _max_dim(aten.max.dim, (negate(args[0]), *args[1:]), kwargs)
    return negate(values), index


@implements(aten.min.default, aten.amin)
def _min_all(func: Any, args: Any, kwargs: Any) -> Any:
    twin = aten.amax.default if func.overloadpacket is aten.amin else aten.max.default
    return negate(_max_all(twin, (negate(args[0]), *args[1:]), kwargs))


@implements(aten.argmin)
def _argmin(func: Any, args: Any, kwargs: Any) -> Any:
    return _argmax(aten.argmax.default, (negate(args[0]), *args[1:]), kwargs)


__all__ = ["variance"]
