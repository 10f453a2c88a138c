"""aten handlers of AdditiveSharingTensor: integer (Z_2^64) arithmetic on shared values.

These serve users who share int64 tensors directly (``torch.tensor([3, 4]).share(...)``).
Fixed-point values never come through here: their handlers call the protocols directly.
Comparisons return shares of 0/1 (as int64).
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import _views
from veil.mpc.sharing import OPS, AdditiveSharingTensor

aten = torch.ops.aten
AST = AdditiveSharingTensor
implements = OPS.implements


def _value(x: Any) -> Any:
    if type(x) is AST:
        return x
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            raise NotImplementedError(
                "shared int64 values cannot be combined with floats; use .fix_precision() first"
            )
        return x.to(torch.int64)
    if isinstance(x, float):
        if not x.is_integer():
            raise NotImplementedError("shared int64 values cannot be combined with floats")
        return int(x)
    return int(x)


@implements(aten.detach, aten.alias, aten.clone, aten.lift_fresh)
def _detach(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    return AST(list(x.shares), x.ctx)


@implements(aten.add.Tensor, aten.add.Scalar)
def _add(func: Any, args: Any, kwargs: Any) -> Any:
    b = _value(args[1])
    alpha = kwargs.get("alpha", 1)
    if alpha != 1:
        b = V.mul_int(b, int(alpha)) if type(b) is AST else b * int(alpha)
    return V.add(_value(args[0]), b)


@implements(aten.sub.Tensor, aten.sub.Scalar)
def _sub(func: Any, args: Any, kwargs: Any) -> Any:
    b = _value(args[1])
    alpha = kwargs.get("alpha", 1)
    if alpha != 1:
        b = V.mul_int(b, int(alpha)) if type(b) is AST else b * int(alpha)
    return V.sub(_value(args[0]), b)


@implements(aten.rsub.Tensor, aten.rsub.Scalar)
def _rsub(func: Any, args: Any, kwargs: Any) -> Any:
    return V.sub(_value(args[1]), _value(args[0]))


@implements(aten.neg)
def _neg(func: Any, args: Any, kwargs: Any) -> Any:
    return V.neg(args[0])


@implements(aten.mul.Tensor, aten.mul.Scalar)
def _mul(func: Any, args: Any, kwargs: Any) -> Any:
    a, b = _value(args[0]), _value(args[1])
    if type(a) is AST and type(b) is AST:
        return V.product(a, b)
    x, k = (a, b) if type(a) is AST else (b, a)
    return V.mul_int(x, k)


@implements(aten.mm, aten.bmm, aten.matmul, aten.mv, aten.dot)
def _mm(func: Any, args: Any, kwargs: Any) -> Any:
    return V.product(_value(args[0]), _value(args[1]), "matmul")


@implements(aten.pow.Tensor_Scalar)
def _pow(func: Any, args: Any, kwargs: Any) -> Any:
    x, k = args[0], args[1]
    if not isinstance(k, int) or not 1 <= k <= 64:
        raise NotImplementedError(f"{func}: only integer powers 1..64 of shared integers")
    result, base = None, x
    while True:
        if k & 1:
            result = base if result is None else V.product(result, base)
        k >>= 1
        if not k:
            return result
        base = V.product(base, base)


def _inplace(out: AST, target: AST) -> AST:
    target.shares = out.shares
    target.ctx = out.ctx
    return target


@implements(aten.add_.Tensor, aten.add_.Scalar)
def _add_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_add(func, args, kwargs), args[0])


@implements(aten.sub_.Tensor, aten.sub_.Scalar)
def _sub_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_sub(func, args, kwargs), args[0])


@implements(aten.mul_.Tensor, aten.mul_.Scalar)
def _mul_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_mul(func, args, kwargs), args[0])


@implements(aten.sum.dim_IntList)
def _sum_dim(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = list(range(x.dim())) if not dim else ([dim] if isinstance(dim, int) else list(dim))
    return V.shape_op(x, "sum", dims, keepdim)


@implements(aten.sum.default)
def _sum(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    return V.shape_op(x, "sum", list(range(x.dim())), False)


def _shape_handler(name: str) -> Any:
    def handler(func: Any, args: Any, kwargs: Any) -> Any:
        params = (*args[1:], *kwargs.values())
        out = V.shape_op(args[0], name, *params)
        return _views.record(out, args[0], name, params) if name in _views.VIEW_OPS else out

    return handler


for _name, _op in (
    ("view", aten.view),
    ("_unsafe_view", aten._unsafe_view),
    ("reshape", aten.reshape),
    ("t", aten.t),
    ("transpose", aten.transpose),
    ("permute", aten.permute),
    ("expand", aten.expand),
    ("unsqueeze", aten.unsqueeze),
    ("flip", aten.flip),
    ("slice", aten.slice),
    ("select", aten.select),
    ("repeat", aten.repeat),
    ("roll", aten.roll),
):
    implements(_op)(_shape_handler(_name))
implements(aten.squeeze.default)(_shape_handler("squeeze"))
implements(aten.squeeze.dim)(_shape_handler("squeeze.dim"))
implements(aten.squeeze.dims)(_shape_handler("squeeze.dims"))


def _inplace_shape_handler(name: str) -> Any:
    """In-place view ops: every share takes the out-of-place op, the wrapper's sizes follow."""

    def handler(func: Any, args: Any, kwargs: Any) -> Any:
        x = args[0]
        old_shape = tuple(x.shape)
        params = (*args[1:], *kwargs.values())
        x.shares = V.shape_op(x, name, *params).shares
        V.restride(func, x, args[1:], kwargs)
        _views.reshaped(x, name, params, old_shape)
        return x

    return handler


for _name, _op in V.INPLACE_SHAPE_OPS:
    implements(_op)(_inplace_shape_handler(_name))


@implements(aten.index.Tensor)
def _index(func: Any, args: Any, kwargs: Any) -> Any:
    for ix in args[1]:
        if ix is not None and type(ix) is not torch.Tensor:
            raise NotImplementedError(f"{func}: indexing with secret indices is not supported")
    return V.shape_op(args[0], "index", args[1])


@implements(aten.cat, aten.stack)
def _cat(func: Any, args: Any, kwargs: Any) -> Any:
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    name = "cat" if func.overloadpacket is aten.cat else "stack"
    return V.cat([_value(t) for t in args[0]], name, dim)


def _compare(a: Any, b: Any, op: str) -> Any:
    a, b = _value(a), _value(b)
    if op in ("le", "lt"):
        a, b = b, a
        op = "ge" if op == "le" else "gt"
    if op == "ge":
        return V.sign(V.sub(a, b))
    if op == "gt":
        return V.sub(1, V.sign(V.sub(b, a)))
    d = V.sub(a, b)
    both = V.sign(V.cat([d, V.neg(d)], "stack", 0))
    eq = V.sub(V.add(V.shape_op(both, "select", 0, 0), V.shape_op(both, "select", 0, 1)), 1)
    return eq if op == "eq" else V.sub(1, eq)


for _cmp in ("ge", "gt", "le", "lt", "eq", "ne"):

    def _make(op: str) -> Any:
        def handler(func: Any, args: Any, kwargs: Any) -> Any:
            return _compare(args[0], args[1], op)

        return handler

    implements(getattr(aten, _cmp).Tensor, getattr(aten, _cmp).Scalar)(_make(_cmp))


@implements(aten.relu)
def _relu(func: Any, args: Any, kwargs: Any) -> Any:
    return V.relu(args[0])[1]


__all__: list[str] = []
