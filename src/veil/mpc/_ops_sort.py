"""Sorting shared values: ``torch.sort``, ``topk``, ``argsort``, ``kthvalue`` and
``median`` (the lower one, as torch), with gradients.

Protocol, along the sorted dim of ``n`` values ``a`` (sorting ``-a`` for descending order):

1. **Ranks.** One batched comparison of all ``n^2`` differences ``a_i - a_j`` gives
   ``rank_i = #{j < i: a_j <= a_i} + #{j > i: a_j < a_i}``: a value's position in the
   sorted order, ties broken by index (so every rank is distinct).
2. **Permutation.** One more batched comparison, of ``rank_i - r`` for ``r = 0..n``, gives
   the secret permutation matrix ``P[r, i] = [rank_i >= r] - [rank_i >= r + 1]``.
3. **Values and indices.** ``sorted = P a`` (one product), ``indices = P (0, 1, ..., n-1)``
   (local: the positions are public). ``topk`` keeps the first ``k`` rows of ``P``,
   ``kthvalue`` and ``median`` one row.
4. **Gradient.** ``sort``/``topk``'s backward scatters the output gradient through the
   indices; veil does it as ``P^T g`` (one product), so no position is revealed.

Exact for ``|a| < 2^61`` ring units (the comparisons' range). Cost: 2 comparisons of
``O(n^2)`` values and one product (about 15 rounds), so it suits the short dims of top-k
classification or ranking heads, not long sequences.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc._ops_fixed import child_of
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements


def permutation(a: Any) -> Any:
    """The secret 0/1 matrix ``P[..., r, i]`` (ring values) sorting ``a[..., i]`` ascending."""
    n = a.shape[-1]
    diff = V.sub(V.shape_op(a, "unsqueeze", -1), V.shape_op(a, "unsqueeze", -2))  # a_i - a_j
    ge = V.sign(diff)  # [a_i >= a_j]
    le = V.shape_op(ge, "transpose", -2, -1)  # [a_j >= a_i]: the same comparisons
    below = torch.ones(n, n, dtype=torch.int64).tril(-1)  # j < i: count a_j <= a_i
    above = torch.ones(n, n, dtype=torch.int64).triu(1)  # j > i: count a_j < a_i
    counted = V.add(V.mul_int(ge, below), V.sub(above, V.mul_int(le, above)))
    rank = V.shape_op(counted, "sum", [-1], True)  # (..., n, 1)
    steps = torch.arange(n + 1, dtype=torch.int64)
    at_least = V.sign(V.sub(rank, steps))  # (..., n, n + 1): [rank_i >= r]
    lower = V.shape_op(at_least, "slice", -1, 0, n, 1)
    upper = V.shape_op(at_least, "slice", -1, 1, n + 1, 1)
    return V.shape_op(V.sub(lower, upper), "transpose", -2, -1)  # (..., r, i)


def _sorted(x: FixedPrecisionTensor, dim: int, descending: bool, k: int | None) -> Any:
    """Values and indices (secret) of the ``k`` first sorted entries along ``dim``."""
    dim = dim % x.dim() if x.dim() else 0
    child = child_of(x)
    if x.dim() == 0:
        return FPT(child, x.precision_bits, x.dtype), FPT(V.mul_int(child, 0), 0, torch.int64)
    last = V.shape_op(child, "transpose", dim, -1) if dim != x.dim() - 1 else child
    n = last.shape[-1]
    perm = permutation(V.neg(last) if descending else last)
    if k is not None:
        perm = V.shape_op(perm, "slice", -2, 0, k, 1)
    values = V.product(perm, V.shape_op(last, "unsqueeze", -1), "matmul")
    values = V.shape_op(values, "squeeze.dim", -1)
    positions = torch.arange(n, dtype=torch.int64)
    indices = V.shape_op(V.mul_int(perm, positions), "sum", [-1], False)
    if dim != x.dim() - 1:
        values = V.shape_op(values, "transpose", dim, -1)
        indices = V.shape_op(indices, "transpose", dim, -1)
    out = FPT(values, x.precision_bits, x.dtype)
    idx = FPT(indices, 0, torch.int64)
    idx.cache = {"perm": perm, "perm_dim": dim}
    return out, idx


@implements(aten.sort.default, aten.sort.stable)
def _sort(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    if func is aten.sort.stable:
        dim = kwargs.get("dim", -1)
        descending = kwargs.get("descending", False)
    else:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        descending = args[2] if len(args) > 2 else kwargs.get("descending", False)
    return _sorted(x, dim, bool(descending), None)


@implements(aten.topk)
def _topk(func: Any, args: Any, kwargs: Any) -> Any:
    x, k = args[0], int(args[1])
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    largest = args[3] if len(args) > 3 else kwargs.get("largest", True)
    size = x.shape[dim] if x.dim() else 1
    if not 0 <= k <= size:
        raise ValueError(f"topk: k={k} out of range for a dim of size {size}")
    return _sorted(x, dim, bool(largest), k)


def _kth(x: FixedPrecisionTensor, k: int, dim: int, keepdim: bool) -> Any:
    """The ``k``-th smallest value (1-based) along ``dim`` and its secret index."""
    if x.dim() == 0:  # torch accepts dim 0 or -1 of a scalar: the value itself, index 0
        return _kth(x.reshape(1), k, 0, False)
    dim = dim % x.dim()
    size = x.shape[dim]
    if not 1 <= k <= size:
        raise ValueError(f"kthvalue: k={k} out of range for a dim of size {size}")
    values, indices = _sorted(x, dim, False, k)
    row = V.shape_op(indices.cache["perm"], "slice", -2, k - 1, k, 1)  # (..., 1, n)
    value = V.shape_op(child_of(values), "slice", dim, k - 1, k, 1)
    index = V.shape_op(child_of(indices), "slice", dim, k - 1, k, 1)
    if not keepdim:
        value = V.shape_op(value, "squeeze.dim", dim)
        index = V.shape_op(index, "squeeze.dim", dim)
    out = FPT(value, x.precision_bits, x.dtype)
    idx = FPT(index, 0, torch.int64)
    # "dim": autograd's unsqueeze of the indices keeps this (see _ops_fixed)
    idx.cache = {"perm": row, "perm_dim": dim, "dim": dim}
    return out, idx


@implements(aten.kthvalue)
def _kthvalue(func: Any, args: Any, kwargs: Any) -> Any:
    x, k = args[0], int(args[1])
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    return _kth(x, k, dim, bool(keepdim))


@implements(aten.median.dim)
def _median_dim(func: Any, args: Any, kwargs: Any) -> Any:
    """The lower median, as torch: the ``(n + 1) // 2``-th smallest value."""
    x, dim = args[0], args[1]
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    n = x.shape[dim] if x.dim() else 1
    return _kth(x, (n + 1) // 2, dim, bool(keepdim))


@implements(aten.median.default)
def _median(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    flat = FPT(V.shape_op(child_of(x), "reshape", [-1]), x.precision_bits, x.dtype)
    value, _ = _kth(flat, (flat.shape[0] + 1) // 2, 0, False)
    return value


def scatter_through_permutation(base: Any, dim: int, index: Any, src: Any) -> Any:
    """``base.scatter(dim, index, src)`` for the secret indices of a sort/topk: ``P^T src``
    along ``dim`` (``base`` must be zeros: autograd's case)."""
    cache = index.cache
    dim = dim % base.dim()
    if dim != cache["perm_dim"]:
        raise NotImplementedError("scatter along another dim than the sort's")
    b = child_of(base)
    if type(b) is not torch.Tensor or b.any():
        raise NotImplementedError("scatter through sort indices into a non-zero tensor")
    g = child_of(src)
    last = V.shape_op(g, "transpose", dim, -1) if dim != base.dim() - 1 else g
    spread = V.product(
        V.shape_op(cache["perm"], "transpose", -2, -1),
        V.shape_op(last, "unsqueeze", -1),
        "matmul",
    )
    spread = V.shape_op(spread, "squeeze.dim", -1)
    if dim != base.dim() - 1:
        spread = V.shape_op(spread, "transpose", dim, -1)
    return FPT(spread, src.precision_bits, src.dtype)


__all__ = ["permutation", "scatter_through_permutation"]
