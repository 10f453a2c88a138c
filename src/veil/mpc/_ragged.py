"""Maxima over public groups of positions of different sizes (ragged windows).

Adaptive max pooling with windows of unequal sizes and ``scatter_reduce`` with ``amax`` or
``amin`` both take, for every output, the maximum over a public set of input positions whose
size varies from output to output. The protocol pads every set to the largest one:

1. a public column of :data:`PAD` (below every value the comparisons order, so never a
   maximum) is appended to the values' last dimension;
2. a public ``(G, K)`` table lists each output's positions, ``-1`` (the pad column) where a
   set is shorter than ``K``; gathering by it is local to the parties;
3. the tournament of :func:`veil.mpc.approximations.max_with_onehot` takes the maximum of
   each row of ``K`` and its one-hot position (ties to the first listed position);
4. the gradient (:func:`spread`) multiplies the output's gradient into the one-hot (one
   product) and adds it back at the listed positions (local), dropping the pad column.

Values need ``|x| < 2^61`` ring units (``2^45`` at 16 fractional bits), the comparisons' own
range. Rounds: those of a tournament over ``K``.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import _views
from veil.mpc import approximations as A
from veil.mpc.fixed import FixedPrecisionTensor

FPT = FixedPrecisionTensor

#: Ring value standing in for "no position": below every value the comparisons order
#: exactly (they need differences below 2^62), so never a window's maximum.
PAD = -(1 << 61)


def group_max(x: FixedPrecisionTensor, groups: torch.Tensor) -> tuple[Any, Any]:
    """The maximum of ``x`` (..., n) over each row of the public position table ``groups``
    (G, K) or (..., G, K) (entries in ``[0, n)``, ``-1`` for none; every row names at least
    one position): ring values (..., G) and the one-hot (..., G, K) for :func:`spread`."""
    c = x.child
    lead, n = tuple(c.shape[:-1]), c.shape[-1]
    g, k = groups.shape[-2:]
    padded = V.cat([c, torch.full((*lead, 1), PAD, dtype=torch.int64)], "cat", -1)
    table = torch.where(groups < 0, n, groups)
    if groups.dim() == 2:
        picked = V.shape_op(padded, "index_select", -1, table.reshape(-1))
    else:
        picked = V.shape_op(padded, "gather", -1, table.reshape(*lead, g * k))
    win = FPT(V.shape_op(picked, "reshape", [*lead, g, k]), x.precision_bits, x.dtype)
    values, onehot = A.max_with_onehot(win, -1)
    return V.shape_op(values, "squeeze.dim", -1), onehot


def spread(grad: Any, onehot: Any, groups: torch.Tensor, n: int) -> Any:
    """The gradient of :func:`group_max` over ``(..., n)`` values: each output's ring
    gradient ``grad`` (..., G) added at the position its one-hot marks (one product, then a
    local scatter-add over the table ``groups`` (G, K) shared by all leading dimensions)."""
    g, k = groups.shape
    lead = tuple(grad.shape[:-1])
    contrib = V.product(V.shape_op(grad, "unsqueeze", -1), onehot)  # (..., G, K)
    contrib = V.shape_op(contrib, "reshape", [*lead, g * k])
    table = torch.where(groups < 0, n, groups).reshape(-1)
    zeros = torch.zeros((*lead, n + 1), dtype=torch.int64)
    out = _views.scatter(zeros, contrib, "add_at", ("index", -1, table))
    return V.shape_op(out, "slice", -1, 0, n, 1)


def positions(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The table of :func:`group_max` for the intervals ``[starts[i], ends[i])`` (1-D, each
    non-empty): row ``i`` lists them in order, ``-1`` after its end."""
    k = int((ends - starts).max())
    table = starts[:, None] + torch.arange(k)
    return torch.where(table < ends[:, None], table, -1)


def scatter_groups(index: torch.Tensor, n: int, include_self: bool) -> torch.Tensor:
    """The table of :func:`group_max` for a scatter along the last dimension: ``index``
    (..., E) sends element ``e`` of each row to position ``index[..., e]`` of ``n`` (``-1``:
    nowhere); values are the row's ``n`` own followed by its ``E`` scattered ones. Row
    ``(..., t)`` of the result (..., n, K) lists ``t`` itself first when ``include_self``
    or when nothing is sent to ``t``, then ``n + e`` for each ``e`` sent there, in order."""
    lead, e = tuple(index.shape[:-1]), index.shape[-1]
    rows = 1
    for s in lead:
        rows *= s
    idx = index.reshape(rows, e)
    groups = rows * n  # one per (row, target); index groups + 1 collects the "nowhere"s
    key = torch.where(idx >= 0, torch.arange(rows)[:, None] * n + idx, groups).reshape(-1)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    counts = torch.bincount(key, minlength=groups + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key.numel()) - starts[sorted_key]
    own = torch.ones(groups, dtype=torch.bool) if include_self else counts[:groups] == 0
    k = int((counts[:groups] + own).max())
    table = torch.full((groups, k), -1, dtype=torch.int64)
    table[own, 0] = (torch.arange(groups) % n)[own]
    sent = sorted_key < groups
    target = sorted_key[sent]
    table[target, own[target].long() + rank[sent]] = n + order[sent] % e
    return table.reshape(*lead, n, k)


__all__ = ["PAD", "group_max", "positions", "scatter_groups", "spread"]
