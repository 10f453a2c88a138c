"""Writes (and masked reads) at public positions on FixedPrecisionTensors: ``x[idx] = v``
(``index_put``), ``index_add``, ``scatter_add``, ``scatter_reduce`` and ``index_reduce``
with ``sum``, ``mean``, ``amax`` or ``amin`` (the aggregations of message-passing graph
networks), and ``masked_select``/``masked_scatter`` at public masks.

The positions are public (they say where values go, as an index says which rows are read).
Every write but the maxima is local to the parties: each writes its share of the source
(party 0 a public one, the others zeros) at the positions in its share of the target
(:func:`written_at`); the mean's public counts cost one truncation. ``amax``/``amin`` take,
for every written position, the maximum over the values scattered into it (and its own with
``include_self``): groups whose sizes differ, padded to the largest
(:mod:`veil.mpc._ragged`), one tournament for all of them.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _ragged as R
from veil.mpc import _values as V
from veil.mpc import _views
from veil.mpc._ops_fixed import _as_child, _inplace, child_of, fpt_args, multiply, scale_each
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


def aligned(x: Any, src: Any) -> tuple[Any, Any, int, torch.dtype]:
    """Ring values of ``x`` and ``src`` (FixedPrecisionTensors or public) at one precision,
    that of the first fixed-point one, and its dtype."""
    first = fpt_args((x, src))
    f = first.precision_bits
    cx = _as_child(x, x.precision_bits if type(x) is FPT else None, f)
    cs = _as_child(src, src.precision_bits if type(src) is FPT else None, f)
    return cx, cs, f, first.dtype


@implements(aten.index_put_, aten.index_put)
def _index_put(func: Any, args: Any, kwargs: Any) -> Any:
    """``x[indices] = values`` (``x.index_put_``; ``accumulate=True`` adds): each party puts
    its share of the values (party 0 a public value, the others zeros) at the public
    ``indices`` of its share of ``x``. Local: no round, nothing revealed."""
    x, indices, values = args[0], args[1], args[2]
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    if type(x) is not FPT:
        raise TypeError(
            f"{func}: fixed-precision values cannot be written into a plain {x.dtype} tensor"
        )
    for ix in indices:
        if ix is not None and type(ix) is not torch.Tensor:
            raise NotImplementedError(f"{func}: writing at secret indices is not supported")
    out = written_at(x, values, "put", (list(indices), bool(accumulate)))
    if func.overloadpacket is aten.index_put:
        return out
    x.child = out.child
    x.__dict__.pop("cache", None)
    return x


def written_at(x: Any, src: Any, name: str, params: tuple[Any, ...]) -> FixedPrecisionTensor:
    """``x`` with ``src`` written or added at public positions by the local scatter op
    ``name`` (``put``, ``add_at``: see :func:`veil.mpc._views.scatter`): each party writes
    its share of ``src`` (party 0 a public one) into its share of ``x``. No round."""
    cx, cs, f, dtype = aligned(x, src)
    return FPT(_views.scatter(cx, cs, name, params), f, dtype)


def _add_at(func: Any, args: Any, kwargs: Any, how: str) -> FixedPrecisionTensor:
    """``x.scatter_add(dim, index, src)`` / ``x.index_add(dim, index, src, alpha=a)`` at
    public indices: each party adds its share of ``src`` (party 0 a public one) into its
    share of ``x``. Local: message passing over a public graph costs no round."""
    x, dim, index, src = args[0], args[1], args[2], args[3]
    alpha = kwargs.get("alpha", 1)
    if type(index) is not torch.Tensor:
        raise NotImplementedError(f"{func}: secret indices")
    if alpha != 1:
        src = multiply(src, alpha) if type(src) is FPT else src * alpha
    return written_at(x, src, "add_at", (how, dim, index))


@implements(aten.scatter_add.default)
def _scatter_add(func: Any, args: Any, kwargs: Any) -> Any:
    return _add_at(func, args, kwargs, "scatter")


@implements(aten.index_add.default)
def _index_add(func: Any, args: Any, kwargs: Any) -> Any:
    return _add_at(func, args, kwargs, "index")


@implements(aten.scatter_add_.default)
def _scatter_add_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_add_at(func, args, kwargs, "scatter"), args[0])


@implements(aten.index_add_.default)
def _index_add_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_add_at(func, args, kwargs, "index"), args[0])


@implements(aten.scatter_reduce.two)
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


@implements(aten.index_reduce.default)
def _index_reduce(func: Any, args: Any, kwargs: Any) -> Any:
    """``x.index_reduce(dim, index, source, reduce, include_self=...)``: ``scatter_reduce``
    with the public 1-D ``index`` spread along ``dim`` over ``source``'s shape (``mean``,
    ``amax``, ``amin``; ``prod`` raises)."""
    x, dim, index, source, reduce = args[:5]
    include_self = args[5] if len(args) > 5 else kwargs.get("include_self", True)
    if type(index) is not torch.Tensor:
        raise NotImplementedError(f"{func}: secret indices")
    dim = dim % max(source.dim(), 1)
    shape = [1] * source.dim()
    shape[dim] = -1
    spread = index.reshape(shape).expand(tuple(source.shape))
    return _scatter_reduce(aten.scatter_reduce.two, (x, dim, spread, source, reduce),
                           {"include_self": include_self})


@implements(aten.masked_select.default)
def _masked_select(func: Any, args: Any, kwargs: Any) -> Any:
    """``x[mask]`` for a public boolean ``mask`` (broadcast with ``x``): which positions
    are read is public, as for any index. A secret mask raises: the result's length
    would reveal how many are set."""
    x, mask = args[0], args[1]
    if type(mask) is not torch.Tensor:
        raise NotImplementedError(
            f"{func}: a secret mask (the result's length would reveal how many are set)"
        )
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(mask.shape))
    c = child_of(x) if type(x) is FPT else x
    c = V.shape_op(c, "expand", list(shape))
    return FPT(V.shape_op(c, "index", [mask.expand(shape)]), x.precision_bits, x.dtype)


def _masked_scatter(func: Any, x: Any, mask: Any, source: Any) -> FixedPrecisionTensor:
    if type(mask) is not torch.Tensor:
        raise NotImplementedError(f"{func}: a secret mask")
    mask = mask.expand(tuple(x.shape))
    count = int(mask.sum())
    values = source.reshape(-1)[:count]
    return written_at(x, values, "put", ([mask], False))


@implements(aten.masked_scatter.default)
def _masked_scatter_op(func: Any, args: Any, kwargs: Any) -> Any:
    """``x.masked_scatter(mask, source)`` for a public ``mask``: the first ``mask.sum()``
    values of ``source``, in order, written where ``mask`` is set (local; the gradient of
    ``masked_select``)."""
    return _masked_scatter(func, args[0], args[1], args[2])


@implements(aten.masked_scatter_.default)
def _masked_scatter_inplace(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_masked_scatter(func, args[0], args[1], args[2]), args[0])


@implements(aten.masked_scatter_backward.default)
def _masked_scatter_backward(func: Any, args: Any, kwargs: Any) -> Any:
    """The gradient of ``masked_scatter``'s source: the output gradient where the public
    mask is set, in order, then zeros for the source's unused values."""
    grad, mask, sizes = args[0], args[1], [int(s) for s in args[2]]
    picked = _masked_select(func, (grad, mask), {})
    total = 1
    for s in sizes:
        total *= s
    c = V.shape_op(child_of(picked), "constant_pad_nd", [0, total - picked.numel()], 0)
    return FPT(V.shape_op(c, "reshape", sizes), grad.precision_bits, grad.dtype)


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
    cx, cs, f, dtype = aligned(x, src)
    nd = len(index.shape)
    dim = dim % max(nd, 1)
    if nd == 0 or index.numel() == 0:
        return FPT(V.shape_op(cx, "clone"), f, dtype)
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
    values, _ = R.group_max(FPT(joined, f, dtype), table)
    if smallest:
        values = V.shape_op(values, "neg")
    return FPT(V.shape_op(values, "transpose", dim, -1), f, dtype)
