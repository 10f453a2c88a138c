"""aten handlers of FixedPrecisionTensor for comparison results: logical ``& | ^ ~`` on
0/1 values, ``where`` with a secret condition, and the NaN checks that autograd's formulas
and torch's decompositions make (fixed-point values are never NaN).

Logical operations are exact: ``a and b = ab`` (one product, no truncation), ``a or b =
a + b - ab``, ``a xor b = a + b - 2ab``, ``not a = 1 - a``. ``where(c, x, y) = y + c (x - y)``
is one product (:func:`veil.mpc._values.select`).
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import encoding
from veil.mpc._ops_fixed import _as_child, _inplace, child_of, fixed_pair
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


@implements(aten.isnan, aten.isinf, aten.isposinf, aten.isneginf)
def _never(func: Any, args: Any, kwargs: Any) -> Any:
    """Fixed-point values are never NaN or infinite (encoding refuses them): public False."""
    return torch.zeros(tuple(args[0].shape), dtype=torch.bool)


@implements(aten.isfinite)
def _always(func: Any, args: Any, kwargs: Any) -> Any:
    """``isfinite``: public True (torch's decompositions, e.g. of ``logaddexp``, call it)."""
    return torch.ones(tuple(args[0].shape), dtype=torch.bool)


def _bit(func: Any, x: Any) -> Any:
    """The 0/1 ring value of a comparison result, a public bool tensor or a Python bool."""
    if type(x) is FPT:
        if x.dtype is not torch.bool:
            raise NotImplementedError(
                f"{func} on a FixedPrecisionTensor of dtype {x.dtype}: logical operations take "
                "comparison results (dtype bool)"
            )
        return child_of(x)
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, torch.Tensor) and x.dtype is torch.bool:
        return x.to(torch.int64)
    raise NotImplementedError(f"{func} with a {type(x).__name__} operand of a bool tensor")


def logical(func: Any, a: Any, b: Any, op: str) -> FixedPrecisionTensor:
    """``a and b = ab``, ``a or b = a + b - ab``, ``a xor b = a + b - 2ab`` on 0/1 values:
    one exact product (no truncation), shared when either operand is."""
    x, y = _bit(func, a), _bit(func, b)
    if isinstance(x, int):
        x, y = y, x
    both = V.mul_int(x, y) if isinstance(y, int) else V.product(x, y)
    if op == "and":
        return FPT(both, 0, torch.bool)
    total = V.add(x, y) if not isinstance(y, int) else V.add(x, torch.tensor(y))
    return FPT(V.sub(total, V.mul_int(both, 1 if op == "or" else 2)), 0, torch.bool)


def _logical_handler(op: str, in_place: bool) -> Any:
    def handler(func: Any, args: Any, kwargs: Any) -> Any:
        out = logical(func, args[0], args[1], op)
        return _inplace(out, args[0]) if in_place else out

    return handler


for _op, _packets, _packets_ in (
    (
        "and",
        (aten.logical_and, aten.bitwise_and, aten.__and__),
        (aten.logical_and_, aten.bitwise_and_, aten.__iand__),
    ),
    (
        "or",
        (aten.logical_or, aten.bitwise_or, aten.__or__),
        (aten.logical_or_, aten.bitwise_or_, aten.__ior__),
    ),
    (
        "xor",
        (aten.logical_xor, aten.bitwise_xor, aten.__xor__),
        (aten.logical_xor_, aten.bitwise_xor_, aten.__ixor__),
    ),
):
    implements(*_packets)(_logical_handler(_op, False))
    implements(*_packets_)(_logical_handler(_op, True))


@implements(aten.logical_not, aten.bitwise_not)
def _logical_not(func: Any, args: Any, kwargs: Any) -> Any:
    return FPT(V.sub(1, _bit(func, args[0])), 0, torch.bool)


@implements(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(func: Any, args: Any, kwargs: Any) -> Any:
    cond, x, y = args
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        shape = torch.broadcast_shapes(
            *(t.shape for t in (cond, x, y) if isinstance(t, torch.Tensor))
        )
        x, y = (t if isinstance(t, torch.Tensor) else torch.full(shape, t) for t in (x, y))
    if type(x) is FPT or type(y) is FPT:
        cx, cy, f, dtype = fixed_pair(x, y)
    elif x.is_floating_point() or y.is_floating_point():  # public values, a secret choice
        f, dtype = encoding.DEFAULT_PRECISION, torch.float32
        cx, cy = _as_child(x, None, f), _as_child(y, None, f)
    else:
        cx, cy, f, dtype = x.to(torch.int64), y.to(torch.int64), 0, torch.int64
    c = child_of(cond) if type(cond) is FPT else cond.to(torch.int64)
    return FPT(V.select(c, cx, cy), f, dtype)


@implements(aten.masked_fill, aten.masked_fill_)
def _masked_fill(func: Any, args: Any, kwargs: Any) -> Any:
    """``x.masked_fill(mask, value) = where(mask, value, x)``: local for a public mask, one
    product for a secret one."""
    x, mask, value = args[0], args[1], args[2]
    if isinstance(value, torch.Tensor) and type(value) is not FPT and value.dim() == 0:
        value = value.item()
    out = _where(aten.where.self, (mask, value, x), {})
    return _inplace(out, x) if func.overloadpacket is aten.masked_fill_ else out


__all__ = ["logical"]
