"""``nn.EmbeddingBag`` (``F.embedding_bag``) on FixedPrecisionTensors, forward and backward.

The indices, offsets and modes are public (they say which rows are read, as for
``nn.Embedding``); the table and the per-sample weights may be shared. Every step is local
to the parties except the products with shared per-sample weights:

1. torch's own ``_embedding_bag`` on a zero table of the same shape gives the public
   bookkeeping (each index's bag, each bag's size), so bags, ``include_last_offset`` and
   ``padding_idx`` follow torch exactly;
2. each index position ``i`` gets a public coefficient ``c_i``: 1 (``sum``) or
   ``1 / size(bag)`` (``mean``), 0 for ``padding_idx``, times the per-sample weight when it
   is public;
3. forward: the rows ``W[idx_i]`` are gathered (local), multiplied by shared per-sample
   weights if any (one product), and summed into their bags with the public coefficients
   (a public matrix times the rows: local, one truncation);
4. backward: ``dW`` gets ``c_i * dY[bag_i]`` (times the shared weight) added at row
   ``idx_i`` (a local scatter-add); the per-sample weights' gradient is
   ``<dY[bag_i], W[idx_i]>`` (one product).

``mode="max"``: each bag's maximum per column over its rows (``padding_idx`` rows left out,
an empty bag 0, as torch), one tournament over bags padded to the largest
(:mod:`veil.mpc._ragged`); the backward adds each bag's gradient at the row its one-hot
marks (one product, then local). Ties go to the first position in the bag.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _ragged as R
from veil.mpc import _values as V
from veil.mpc import _views
from veil.mpc._ops_fixed import child_of, matmul, multiply, reduce_sum
from veil.mpc._ops_pool import SecretIndices
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements

_MODES = {0: "sum", 1: "mean", 2: "max"}


def _bookkeeping(weight: Any, indices: torch.Tensor, offsets: torch.Tensor, mode: int,
                 include_last_offset: bool, padding_idx: int) -> tuple[torch.Tensor, ...]:
    """torch's ``(offset2bag, bag_size, max_indices)`` for these indices, from a zero table."""
    if mode not in _MODES:
        raise ValueError(f"aten._embedding_bag: unknown mode {mode!r}")
    zeros = torch.zeros(tuple(weight.shape))
    _, offset2bag, bag_size, max_indices = aten._embedding_bag.default(
        zeros, indices, offsets, False, mode, False, None, include_last_offset, padding_idx
    )
    if offset2bag.numel() != indices.numel():  # torch leaves it empty in some fast paths
        offset2bag = _bags_of(indices, offsets, include_last_offset)
    return offset2bag, bag_size, max_indices


def _bags_of(indices: torch.Tensor, offsets: torch.Tensor, include_last: bool) -> torch.Tensor:
    """Each index position's bag (torch's ``offset2bag``, which it skips for ``sum``)."""
    starts = (offsets[:-1] if include_last else offsets)[1:]
    starts = starts[starts < indices.numel()]
    marks = torch.zeros(indices.numel(), dtype=torch.int64)
    marks.index_add_(0, starts, torch.ones_like(starts))
    return marks.cumsum(0)


def _coefficients(indices: torch.Tensor, offset2bag: torch.Tensor, bag_size: torch.Tensor,
                  mode: int, psw: Any, padding_idx: int) -> torch.Tensor:
    """The public coefficient of each index position (see the module docstring)."""
    coef = torch.ones(indices.numel(), dtype=torch.float64)
    if mode == 1:
        coef = coef / bag_size[offset2bag].clamp(min=1).double()
    if padding_idx >= 0:
        coef = torch.where(indices == padding_idx, 0.0, coef)
    if psw is not None and type(psw) is not FPT:
        coef = coef * psw.double()
    return coef


def _spread(coef: torch.Tensor, offset2bag: torch.Tensor, bags: int) -> torch.Tensor:
    """The public ``(bags, positions)`` matrix summing positions into their bags."""
    out = torch.zeros(bags, coef.numel(), dtype=torch.float64)
    out[offset2bag, torch.arange(coef.numel())] = coef
    return out


def _rows(x: Any, index: torch.Tensor) -> FixedPrecisionTensor:
    """``x[index]``: the rows at public positions (local)."""
    return FPT(V.shape_op(child_of(x), "index", [index]), x.precision_bits, x.dtype)


def _bag_count(offsets: torch.Tensor, include_last_offset: bool) -> int:
    return offsets.numel() - 1 if include_last_offset else offsets.numel()


@implements(aten._embedding_bag, aten._embedding_bag_forward_only)
def _embedding_bag(func: Any, args: Any, kwargs: Any) -> Any:
    names = ("weight", "indices", "offsets", "scale_grad_by_freq", "mode", "sparse",
             "per_sample_weights", "include_last_offset", "padding_idx")
    defaults = (None, None, None, False, 0, False, None, False, -1)
    a = dict(zip(names, defaults))
    a.update(zip(names, args))
    a.update(kwargs)
    weight, indices, offsets, mode = a["weight"], a["indices"], a["offsets"], a["mode"]
    psw, padding_idx = a["per_sample_weights"], a["padding_idx"]
    if type(indices) is not torch.Tensor or type(offsets) is not torch.Tensor:
        raise NotImplementedError(f"{func}: secret indices or offsets")
    if a["scale_grad_by_freq"]:
        raise NotImplementedError(f"{func}: scale_grad_by_freq")
    offset2bag, bag_size, max_indices = _bookkeeping(
        weight, indices, offsets, mode, a["include_last_offset"], padding_idx
    )
    rows = _rows(weight, indices)
    if mode == 2:
        out, argmax = _max_bags(rows, indices, offset2bag, _bag_count(offsets,
                                a["include_last_offset"]), padding_idx)
        return out, offset2bag, bag_size, argmax
    if type(psw) is FPT:
        rows = multiply(rows, psw.unsqueeze(-1))
    coef = _coefficients(indices, offset2bag, bag_size, mode, psw, padding_idx)
    bags = _bag_count(offsets, a["include_last_offset"])
    out = matmul(_spread(coef, offset2bag, bags).to(rows.dtype), rows)
    return out, offset2bag, bag_size, max_indices


def _max_bags(rows: FixedPrecisionTensor, indices: torch.Tensor, offset2bag: torch.Tensor,
              bags: int, padding_idx: int) -> tuple[FixedPrecisionTensor, SecretIndices]:
    """``mode="max"``: each bag's column-wise maximum of its ``rows`` (positions, D), empty
    bags (or all ``padding_idx``) 0; and the one-hot carrier for the backward."""
    positions = indices.numel()
    keep = indices != padding_idx if padding_idx >= 0 else torch.ones(positions, dtype=torch.bool)
    index = torch.where(keep, offset2bag, -1)[None]  # one row: position p goes to its bag
    table = R.scatter_groups(index, bags, include_self=False)[0]  # (bags, K)
    # entries: bags + p for position p; a bag with no rows lists only itself (< bags), which
    # becomes the zero column appended after the positions
    table = torch.where(table >= bags, table - bags,
                        torch.where(table >= 0, positions, -1))
    c = V.shape_op(child_of(rows), "t")  # (D, positions)
    zero = torch.zeros((c.shape[0], 1), dtype=torch.int64)
    joined = FPT(V.cat([c, zero], "cat", -1), rows.precision_bits, rows.dtype)
    values, onehot = R.group_max(joined, table)  # (D, bags)
    out = FPT(V.shape_op(values, "t"), rows.precision_bits, rows.dtype)
    return out, SecretIndices(out.shape, onehot, ("bag", table))


@implements(aten._embedding_bag_backward)
def _embedding_bag_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, indices, _, offset2bag, bag_size, argmax, num_weights, _, mode, sparse, psw = args[:11]
    padding_idx = args[11] if len(args) > 11 else kwargs.get("padding_idx", -1)
    if sparse:
        raise NotImplementedError(f"{func}: sparse gradients on a FixedPrecisionTensor")
    if mode == 2:
        return _max_backward(func, grad, indices, argmax, num_weights)
    return _dense_backward(grad, indices, offset2bag, bag_size, num_weights, mode, psw,
                           padding_idx)


@implements(aten._embedding_bag_dense_backward)
def _embedding_bag_dense_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, indices, offset2bag, bag_size, argmax, num_weights, _, mode, psw = args[:9]
    padding_idx = args[9] if len(args) > 9 else kwargs.get("padding_idx", -1)
    if mode == 2:
        return _max_backward(func, grad, indices, argmax, num_weights)
    return _dense_backward(grad, indices, offset2bag, bag_size, num_weights, mode, psw,
                           padding_idx)


def _max_backward(func: Any, grad: Any, indices: torch.Tensor, argmax: Any,
                  num_weights: int) -> FixedPrecisionTensor:
    """``dW`` of ``mode="max"``: each bag's gradient at the row of its maximum, per column."""
    if type(argmax) is not SecretIndices or argmax.info[0] != "bag":
        raise NotImplementedError(f"{func}: mode 'max' without a secure bag's indices")
    positions = indices.numel()
    g = V.shape_op(child_of(grad), "t")  # (D, bags)
    per_position = R.spread(g, argmax.onehot, argmax.info[1], positions + 1)  # (D, positions+1)
    rows = V.shape_op(V.shape_op(per_position, "slice", -1, 0, positions, 1), "t")
    zeros = torch.zeros((int(num_weights), grad.shape[-1]), dtype=torch.int64)
    child = _views.scatter(zeros, rows, "put", ([indices], True))
    return FPT(child, grad.precision_bits, grad.dtype)


def _dense_backward(grad: Any, indices: torch.Tensor, offset2bag: torch.Tensor,
                    bag_size: torch.Tensor, num_weights: int, mode: int, psw: Any,
                    padding_idx: int) -> Any:
    """``dW``: each position's ``c_i dY[bag_i]`` (times a shared weight) added at its row."""
    coef = _coefficients(indices, offset2bag, bag_size, mode, psw, padding_idx)
    rows = multiply(_rows(grad, offset2bag), coef.unsqueeze(-1).to(grad.dtype))
    if type(psw) is FPT:
        rows = multiply(rows, psw.unsqueeze(-1))
    zeros = torch.zeros((int(num_weights), grad.shape[-1]), dtype=torch.int64)
    child = _views.scatter(zeros, child_of(rows), "put", ([indices], True))
    return FPT(child, grad.precision_bits, grad.dtype)


@implements(aten._embedding_bag_per_sample_weights_backward)
def _embedding_bag_weights_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, weight, indices, _, offset2bag, mode = args[:6]
    padding_idx = args[6] if len(args) > 6 else kwargs.get("padding_idx", -1)
    if mode != 0:
        raise NotImplementedError(f"{func}: per-sample weights need mode 'sum'")
    out = reduce_sum(multiply(_rows(grad, offset2bag), _rows(weight, indices)), [-1])
    if padding_idx >= 0:
        out = multiply(out, (indices != padding_idx).to(torch.int64))
    return out


__all__: list[str] = []
