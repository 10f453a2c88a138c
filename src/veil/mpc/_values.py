"""Operations on ring values: a plain int64 tensor (public) or an AdditiveSharingTensor.

The fixed-point layer calls these with its children; each picks the local computation or
the secure protocol. Plain values are checked for overflow of the ring (they are the test
oracle and must never wrap silently); shared values cannot be checked, so the protocols
document their input ranges instead.
"""

from __future__ import annotations

from typing import Any

import torch

from veil._errors import PrecisionOverflow, ProtocolError
from veil.mpc import protocols
from veil.mpc.protocols import batch
from veil.mpc.provider import convolution, ring_product
from veil.mpc.sharing import (
    LOCAL_OPS,
    AdditiveSharingTensor,
    add_public,
    apply_each,
    combine,
    map_shares,
)
from veil.pointers import PointerTensor, remote_function

AST = AdditiveSharingTensor
aten = torch.ops.aten
_LIMIT = float(2**62)


def is_shared(v: Any) -> bool:
    return type(v) is AST


def check_plain(v: Any) -> None:
    if type(v) is PointerTensor:
        raise ProtocolError(
            "this fixed-precision tensor lives on a worker: .share() it among parties (or "
            ".get() it) before computing on it"
        )


def add(a: Any, b: Any) -> Any:
    sa, sb = type(a) is AST, type(b) is AST
    if sa and sb:
        return combine(a, b, "add")
    if sa:
        return add_public(a, b)
    if sb:
        return add_public(b, a)
    return a + b


def sub(a: Any, b: Any) -> Any:
    sa, sb = type(a) is AST, type(b) is AST
    if sa and sb:
        return combine(a, b, "sub")
    if sa:
        return add_public(a, b, subtract=True)
    if sb:
        return add_public(b, a, reverse=True)
    return a - b


def neg(a: Any) -> Any:
    if type(a) is AST:
        return map_shares(a, "neg")
    return -a


def mul_int(a: Any, k: Any) -> Any:
    """``a * k`` for a public integer (Python int or int64 tensor) ``k``; exact mod 2^64."""
    if type(a) is AST:
        if isinstance(k, torch.Tensor) and k.dtype != torch.int64:
            k = k.to(torch.int64)
        return map_shares(a, "mul", k)
    if isinstance(k, int) and k != 0 and a.numel() and float(a.abs().max()) * abs(k) >= _LIMIT:
        raise PrecisionOverflow("a fixed-point product leaves the ring's range (2^62)")
    return a * k


def shape_op(a: Any, name: str, *args: Any) -> Any:
    """A linear, data-independent op from :data:`LOCAL_OPS` (share-wise when shared)."""
    if type(a) is AST:
        return map_shares(a, name, *args)
    return LOCAL_OPS[name](a, *args)


#: In-place view ops of the wrappers and the out-of-place local op each one applies.
INPLACE_SHAPE_OPS = (
    ("squeeze", aten.squeeze_.default),
    ("squeeze.dim", aten.squeeze_.dim),
    ("squeeze.dims", aten.squeeze_.dims),
    ("unsqueeze", aten.unsqueeze_.default),
    ("t", aten.t_.default),
    ("transpose", aten.transpose_.default),
)


def restride(func: Any, wrapper: torch.Tensor, args: Any, kwargs: Any) -> None:
    """Apply the in-place view op ``func`` to ``wrapper``'s own sizes and strides only
    (below the Python dispatch key: no data is touched, the wrapper has none)."""
    from torch.utils._mode_utils import no_dispatch

    with no_dispatch():
        func(wrapper, *args, **kwargs)


def cat(values: list[Any], name: str, dim: int) -> Any:
    """``cat`` or ``stack`` of ring values; public ones are shared trivially (party 0)."""
    shared = [v for v in values if type(v) is AST]
    if not shared:
        return LOCAL_OPS[name](values, dim)
    ctx = shared[0].ctx
    for v in shared[1:]:
        if v.ctx is not ctx:
            from veil.mpc._runtime import merge

            ctx = merge(ctx, v.ctx)
    n = ctx.n
    per_party: list[list[Any]] = [[] for _ in range(n)]
    for v in values:
        if type(v) is AST:
            for i in range(n):
                per_party[i].append(v.shares[i])
        else:
            per_party[0].append(v)
            zero = torch.zeros_like(v)
            for i in range(1, n):
                per_party[i].append(zero)
    return AST(apply_each(ctx, name, [(lst, dim) for lst in per_party]), ctx)


def _product_meta(
    kind: str, x: torch.Tensor, y: torch.Tensor, params: tuple[Any, ...]
) -> torch.Tensor:
    return ring_product(kind, x, y, tuple(params))


@remote_function("mpc.product", meta=_product_meta)
def product_local(
    kind: str, x: torch.Tensor, y: torch.Tensor, params: tuple[Any, ...]
) -> torch.Tensor:
    """A party's share times a public operand (``*``, ``@`` or convolution), mod 2^64."""
    return ring_product(kind, x, y, tuple(params))


def _plain_check(kind: str, a: torch.Tensor, b: torch.Tensor, params: tuple[Any, ...]) -> None:
    if not a.numel() or not b.numel():
        return
    if kind == "matmul" and params:
        a = a.t() if params[0] else a
        b = b.t() if params[1] else b
        params = ()
    bound = ring_product_float(kind, a.double().abs(), b.double().abs(), params)
    if bound.numel() and float(bound.max()) >= _LIMIT:
        raise PrecisionOverflow(
            "a fixed-point product leaves the ring's range (|product * 2^(2f)| >= 2^62); "
            "use smaller values or fewer precision bits"
        )


def ring_product_float(
    kind: str, a: torch.Tensor, b: torch.Tensor, params: tuple[Any, ...]
) -> torch.Tensor:
    """The product ``kind`` on float values (the overflow bound of plain operands)."""
    if kind == "mul":
        return a * b
    if kind == "matmul":
        return torch.matmul(a, b)
    return convolution(kind, a, b, params)


def _addend(plus: Any, ctx: Any) -> list[Any] | None:
    """Per-party pieces of a ring value to add: its shares, or the public value on party 0."""
    if plus is None:
        return None
    if type(plus) is AST:
        return list(plus.shares)
    return [plus] + [None] * (ctx.n - 1)


def product(
    a: Any,
    b: Any,
    kind: str = "mul",
    params: tuple[Any, ...] = (),
    trunc: int = 0,
    plus: Any = None,
) -> Any:
    """``op(a, b)`` divided by ``2^trunc`` (rounded), plus ``plus`` if given, for any mix of
    shared and public operands. Lazily transposed shared matrices are transposed inside the
    parties' own product steps."""
    sa, sb = type(a) is AST, type(b) is AST
    if sa and sb and (a.numel() == 0 or b.numel() == 0):
        return _empty_product(a, b, kind, params, plus)
    if kind == "matmul" and not params and ((sa and a.transposed) or (sb and b.transposed)):
        params = (sa and a.transposed, sb and b.transposed)
    if sa and sb:
        from veil.mpc._runtime import merge

        ctx = merge(a.ctx, b.ctx)
        # Matrix products transpose lazily transposed operands inside the parties' step;
        # other kinds take the shares as the values are laid out.
        lazy = kind == "matmul"
        op = batch.queue_product(
            ctx,
            a.raw_shares if lazy else a.shares,
            b.raw_shares if lazy else b.shares,
            kind,
            params,
            trunc,
            _addend(plus, ctx),
        )
        return AST.deferred(op, ctx)
    if sa or sb:
        x = a if sa else b
        ctx = x.ctx
        fn = product_local if ctx.remote else ring_product
        own = x.raw_shares if kind == "matmul" else x.shares
        if sa:
            shares = [fn(kind, s, b, params) for s in own]
        else:
            shares = [fn(kind, a, s, params) for s in own]
        if trunc and a.numel() and b.numel():  # an empty operand: zeros, nothing to round
            op = batch.queue_truncation(ctx, shares, trunc, 1, _addend(plus, ctx))
            return AST.deferred(op, ctx)
        out = AST(shares, ctx)
        return out if plus is None else add(out, plus)
    _plain_check(kind, a, b, params)
    z = ring_product(kind, a, b, params)
    if trunc:
        z = (z + (1 << (trunc - 1))) >> trunc
    return z if plus is None else add(z, plus)


def _empty_product(a: AST, b: AST, kind: str, params: tuple[Any, ...], plus: Any) -> AST:
    """A product with an empty operand is all zeros (an empty sum where it is not empty
    itself): each party's product of its own two shares is exactly that, with no protocol
    (which would deal and open nothing)."""
    from veil.mpc._runtime import merge

    ctx = merge(a.ctx, b.ctx)
    fn = product_local if ctx.remote else ring_product
    out = AST([fn(kind, x, y, params) for x, y in zip(a.shares, b.shares)], ctx)
    return out if plus is None else add(out, plus)


def truncate(a: Any, bits: int, scale: int = 1, plus: Any = None) -> Any:
    """``a * scale / 2^bits`` rounded (stochastically when shared, to nearest when public),
    plus ``plus`` if given (fused into the protocol's last step)."""
    if bits == 0:
        out = mul_int(a, scale) if scale != 1 else a
        return out if plus is None else add(out, plus)
    if type(a) is AST and a.numel() == 0:
        return a if plus is None else add(a, plus)
    if type(a) is AST:
        flip = a.transposed  # the parties transpose in the truncation's last step
        shares = a.raw_shares if flip else a.shares
        op = batch.queue_truncation(a.ctx, shares, bits, scale, _addend(plus, a.ctx), flip)
        return AST.deferred(op, a.ctx)
    z = mul_int(a, scale) if scale != 1 else a
    z = (z + (1 << (bits - 1))) >> bits
    return z if plus is None else add(z, plus)


def sign(a: Any) -> Any:
    """``[a >= 0]`` as 0/1 ring values (exact for ``|a| < 2^62``)."""
    if type(a) is AST:
        if a.numel() == 0:
            return mul_int(a, 0)
        return AST(protocols.sign(a.ctx, a.shares), a.ctx)
    return (a >= 0).to(torch.int64)


def relu(a: Any) -> tuple[Any, Any]:
    """``([a >= 0], relu(a))`` as ring values."""
    if type(a) is AST:
        if a.numel() == 0:
            return mul_int(a, 0), a
        s, r = protocols.sign(a.ctx, a.shares, relu=True)
        return AST(s, a.ctx), AST(r, a.ctx)
    s = (a >= 0).to(torch.int64)
    return s, a * s


def select(cond: Any, x: Any, y: Any) -> Any:
    """``cond ? x : y`` for 0/1 ``cond``: ``y + cond * (x - y)`` (one product if shared)."""
    return add(y, product(cond, sub(x, y)))


__all__ = [
    "add",
    "cat",
    "is_shared",
    "mul_int",
    "neg",
    "product",
    "relu",
    "select",
    "shape_op",
    "sign",
    "sub",
    "truncate",
]
