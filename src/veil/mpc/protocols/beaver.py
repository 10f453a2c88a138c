"""SPDZ-style products of two shared values with Beaver triples from the crypto provider.

Protocol ``beaver_product(x, y, op)`` for a bilinear ``op`` (elementwise ``*``, ``@`` or a
2-D convolution), ``n`` parties:

1. The provider draws uniform ``a``, ``b`` (shaped like ``x`` and ``y``), computes
   ``c = op(a, b)`` and deals additive shares of the three (optionally with a truncation
   pair for the product). It never sees ``x`` or ``y``.
2. Each party ``i`` sends ``eps_i = x_i - a_i`` and ``delta_i = y_i - b_i``; the parties
   (never the orchestrator) open ``eps = x - a`` and ``delta = y - b``, which are uniform
   and reveal nothing about ``x`` and ``y``.
3. Each party computes ``z_i = c_i + op(eps, b_i) + op(a_i, delta)``, and party 0 adds
   ``op(eps, delta)``: the ``z_i`` are shares of ``op(x, y)`` because ``op`` is bilinear:
   ``op(x, y) = op(eps + a, delta + b) = op(eps, delta) + op(eps, b) + op(a, delta) + c``.
4. For fixed-point values, the product carries twice the fractional bits: the same step
   also sends ``z_i + r_i`` and a second round truncates (:mod:`.truncation`); with local
   truncation (two parties) each party truncates its ``z_i`` itself in this step instead.

Exact in Z_2^64 (step 3); with truncation the result is within one unit of the last place
(local truncation: unless it fails, see :mod:`.truncation`). One round, two with dealer
truncation. Each triple is used once.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc._runtime import Context, exchange, material, opened
from veil.mpc.protocols import truncation
from veil.mpc.provider import beaver_layout, deal_beaver, ring_product
from veil.pointers import remote_function


def _mask_meta(
    x: torch.Tensor,
    y: torch.Tensor,
    row: torch.Tensor,
    kind: str,
    params: tuple[Any, ...],
    trunc: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.numel() + y.numel(), dtype=torch.int64, device="meta")
    return out, out


@remote_function("mpc.beaver_mask", meta=_mask_meta)
def beaver_mask(
    x: torch.Tensor,
    y: torch.Tensor,
    row: torch.Tensor,
    kind: str,
    params: tuple[Any, ...],
    trunc: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Party step 2: ``(x_i - a_i, y_i - b_i)`` flattened into one message (kept and sent)."""
    lay = beaver_layout(kind, tuple(x.shape), tuple(y.shape), tuple(params), trunc)
    msg = mask_share(x, y, row, lay)
    return msg, msg


def mask_share(x: torch.Tensor, y: torch.Tensor, row: torch.Tensor, lay: Any) -> torch.Tensor:
    """Party step 2 on plain tensors: ``x_i - a_i`` and ``y_i - b_i``, flattened into one."""
    return torch.cat(((x - lay.get(row, "a")).reshape(-1), (y - lay.get(row, "b")).reshape(-1)))


def product_share(
    i: int,
    both: torch.Tensor,
    row: torch.Tensor,
    lay: Any,
    kind: str,
    sx: tuple[int, ...],
    sy: tuple[int, ...],
    params: tuple[Any, ...],
) -> torch.Tensor:
    """Party step 3 on plain tensors: ``z_i`` from the opened ``(eps, delta)`` (flattened)."""
    nx = 1
    for s in sx:
        nx *= s
    eps = both[:nx].view(sx)
    delta = both[nx:].view(sy)
    p = lay.arrays(row)
    b = torch.from_numpy(p["b"])
    z = ring_product(kind, eps, b + delta if i == 0 else b, params)
    z += ring_product(kind, torch.from_numpy(p["a"]), delta, params)
    z += torch.from_numpy(p["c"])
    return z


@remote_function("mpc.beaver_finish")
def beaver_finish(
    i: int,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    row: torch.Tensor,
    kind: str,
    sx: tuple[int, ...],
    sy: tuple[int, ...],
    params: tuple[Any, ...],
    trunc: int,
    addend: torch.Tensor | None = None,
) -> Any:
    """Party step 3: this party's share of ``op(x, y)`` (plus its share of ``addend``);
    with ``trunc``, the masked ``z_i + r_i`` to open for truncation instead (returned
    twice: kept and sent)."""
    sx, sy, params = tuple(sx), tuple(sy), tuple(params)
    lay = beaver_layout(kind, sx, sy, params, trunc)
    z = product_share(i, opened(msg, parts), row, lay, kind, sx, sy, params)
    if not trunc:
        return z if addend is None else z + addend
    z += lay.get(row, "r")
    if i == 0:
        z += truncation.offset(trunc)
    return z, z


def beaver_product(
    ctx: Context,
    xs: list[Any],
    ys: list[Any],
    kind: str = "mul",
    params: tuple[Any, ...] = (),
    trunc: int = 0,
    add: list[Any] | None = None,
) -> list[Any]:
    """Shares of ``op(x, y)`` (then ``>> trunc`` if ``trunc > 0``) from shares of x and y,
    plus ``add[i]`` on party ``i`` if given. With local truncation
    (``ctx.truncation == "local"``) the parties truncate their product shares themselves."""
    if trunc and ctx.truncation == "local":
        zs = beaver_product(ctx, xs, ys, kind, params)
        return truncation.truncate(ctx, zs, trunc, 1, add)
    sx, sy = tuple(xs[0].shape), tuple(ys[0].shape)
    lay = beaver_layout(kind, sx, sy, params, trunc)
    what = "multiplying two shared values"
    bundles = material(ctx, what, deal_beaver, (kind, sx, sy, params, trunc), lay.total)
    n = ctx.n
    msgs = [beaver_mask(xs[i], ys[i], bundles[i], kind, params, trunc) for i in range(n)]
    parts = exchange(ctx, [m[1] for m in msgs])
    add = add or [None] * n
    outs = [
        beaver_finish(
            i,
            msgs[i][0],
            parts[i],
            bundles[i],
            kind,
            sx,
            sy,
            params,
            trunc,
            None if trunc else add[i],
        )
        for i in range(n)
    ]
    if not trunc:
        return outs
    keep, send = [o[0] for o in outs], [o[1] for o in outs]
    return truncation.finish(ctx, keep, send, bundles, trunc, add)


__all__ = ["beaver_finish", "beaver_mask", "beaver_product", "mask_share", "product_share"]
