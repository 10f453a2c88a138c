"""``scatter_reduce`` on FixedPrecisionTensors at public indices: ``sum``, ``mean``,
``amax`` and ``amin`` (the aggregations of message-passing graph networks).

The indices are public (they say which positions are written, as for ``scatter_add``).
``sum`` and ``mean`` are local to the parties (the mean's public counts cost one
truncation); ``amax``/``amin`` take, for every written position, the maximum over the
values scattered into it (and its own with ``include_self``): groups whose sizes differ,
padded to the largest (:mod:`veil.mpc._ragged`), one tournament for all of them.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _ragged as R
from veil.mpc import _values as V
from veil.mpc._ops_fixed import _add_at, _as_child, child_of, fpt_args, multiply, scale_each
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor


@OPS.implements(aten.scatter_reduce.two)
def _scatter_reduce(func: Any, args: Any, kwargs: Any) -> Any:
    """``x.scatter_reduce(dim, index, src, reduce, include_self=...)`` at public indices:
    the sum as ``scatter_add``; the mean divides by the public counts (24-bit factors, one
    truncation); ``amax``/``amin`` by :func:`scatter_extreme`. Positions nothing is
    scattered into keep ``x``. ``prod`` raises."""
    x, dim, index, src, reduce = args[:5]
    include_self = args[5] if len(args) > 5 else kwargs.get("include_self", True)
    if type(index) is not torch.Tensor:
        raise NotImplementedError(f"{func}: secret indices")
    if reduce in ("amax", "amin"):
        return scatter_extreme(x, dim, index, src, reduce == "amin", include_self)
    if reduce not in ("sum", "mean"):
        raise NotImplementedError(
            f"{func}: reduce={reduce!r} (only 'sum', 'mean', 'amax' and 'amin')"
        )
    counts = torch.zeros(tuple(x.shape), dtype=torch.int64).scatter_add(
        dim, index, torch.ones(tuple(index.shape), dtype=torch.int64)
    )
    keep = torch.ones_like(counts) if include_self else (counts == 0).to(torch.int64)
    kept = multiply(x, keep) if type(x) is FPT else x * keep
    total = _add_at(func, (kept, dim, index, src), {}, "scatter")
    if reduce == "sum":
        return total
    return FPT(scale_each(child_of(total), 1.0 / (counts + keep).clamp(min=1).double()),
               total.precision_bits, total.dtype)


def scatter_extreme(
    x: Any, dim: int, index: torch.Tensor, src: Any, smallest: bool, include_self: bool
) -> FixedPrecisionTensor:
    """``x.scatter_reduce(dim, index, src, "amax" | "amin", include_self)``.

    Protocol: ``x`` and ``src`` are joined along ``dim``; every position of ``x`` gets the
    public list of the joined positions scattered into it (its own first when
    ``include_self`` or when nothing is scattered into it, as torch then keeps ``x``), and
    :func:`veil.mpc._ragged.group_max` takes each list's maximum (of the negated values for
    ``amin``). Exact. The gradient is torch's own formula on the result (ties share it
    evenly, as in torch): comparisons and one division.
    """
    first = fpt_args((x, src))
    f = first.precision_bits
    cx = _as_child(x, x.precision_bits if type(x) is FPT else None, f)
    cs = _as_child(src, src.precision_bits if type(src) is FPT else None, f)
    nd = len(index.shape)
    dim = dim % max(nd, 1)
    if nd == 0 or index.numel() == 0:
        return FPT(V.shape_op(cx, "clone"), f, first.dtype)
    if bool((index < 0).any()) or bool((index >= cx.shape[dim]).any()):
        raise IndexError(
            f"scatter_reduce: index out of range for dimension {dim} of size {cx.shape[dim]}"
        )
    # torch reads src and index only over index's extent, and writes x only there too
    for d, size in enumerate(index.shape):
        if cs.shape[d] != size:
            cs = V.shape_op(cs, "slice", d, 0, size, 1)
    shape = tuple(cx.shape)
    pads = []
    for d in reversed(range(nd)):  # F.pad order: last dimension first
        pads += [0, 0] if d == dim else [0, shape[d] - index.shape[d]]
    if any(pads):  # columns of x that index does not reach: nothing is scattered there
        cs = V.shape_op(cs, "constant_pad_nd", pads, 0)
        index = torch.nn.functional.pad(index, pads, value=-1)
    n = shape[dim]
    joined = V.cat([V.shape_op(cx, "transpose", dim, -1), V.shape_op(cs, "transpose", dim, -1)],
                   "cat", -1)
    if smallest:
        joined = V.shape_op(joined, "neg")
    table = R.scatter_groups(index.transpose(dim, -1), n, include_self)
    values, _ = R.group_max(FPT(joined, f, first.dtype), table)
    if smallest:
        values = V.shape_op(values, "neg")
    return FPT(V.shape_op(values, "transpose", dim, -1), f, first.dtype)
