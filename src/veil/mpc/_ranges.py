"""Range reduction by powers of four, for the approximations that need a wide domain
(square roots, reciprocals, logarithms): a value ``a > 0`` is located in one of the bins
``[4^j, 4^(j + 1))`` by exact comparisons with the public bounds, and brought to
``u = a / 4^j`` in [1, 4), where short Newton iterations or polynomials are accurate; the
result is then scaled back by the bin's power of two (or shifted by ``j log 4``). Every step
works on public and on shared ring values alike.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V

#: Fractional bits of a reduced input ``u`` in [1, 4) and of the iterates computed on it.
WIDTH = 24


def bins(f: int) -> tuple[int, int]:
    """The exponents ``(low, high)`` of the bins ``[4^j, 4^(j + 1))`` for values with ``f``
    fractional bits: from four ring units (``4^low >= 2^(2 - f)``) to ``4^(high + 1) <=
    2^(60 - f)``, where the reduction's products stay inside the ring."""
    return -((f - 2) // 2), (60 - f) // 2 - 1


def bins_of_four(a: Any, f: int) -> Any:
    """The one-hot ``(..., J)`` of the bin ``[4^j, 4^(j + 1))`` holding each value of ``a``
    (values below the lowest bin count in it, those above the highest in it): ``J - 1``
    exact comparisons with the public bounds, in one batch, then differences."""
    low, high = bins(f)
    bounds = torch.tensor([round(4.0**j * 2.0**f) for j in range(low + 1, high + 1)])
    c = V.sign(V.sub(V.shape_op(a, "unsqueeze", -1), bounds))  # [a >= 4^j], j > low
    n = high - low
    first = V.sub(1, V.shape_op(c, "slice", -1, 0, 1, 1))
    middle = V.sub(V.shape_op(c, "slice", -1, 0, n - 1, 1), V.shape_op(c, "slice", -1, 1, n, 1))
    last = V.shape_op(c, "slice", -1, n - 1, n, 1)
    return V.cat([first, middle, last], "cat", -1)


def _groups(exponents: list[int], bits: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive bins ``(start, stop, top)`` that can share one truncation by ``top``: in
    each, every bin's value (below ``2^bits[k]`` ring units) times ``2^(exponents[k] + top)``
    stays below ``2^61``."""
    groups: list[tuple[int, int, int]] = []
    start = 0
    while start < len(exponents):
        stop = start + 1
        while stop < len(exponents):
            top = max(-e for e in exponents[start : stop + 1])
            if any(bits[k] + exponents[k] + top > 61 for k in range(start, stop + 1)):
                break
            stop += 1
        groups.append((start, stop, max(-e for e in exponents[start:stop])))
        start = stop
    return groups


def select_shifted(onehot: Any, value: Any, exponents: list[int], bits: list[int]) -> Any:
    """``sum_j onehot_j * value * 2^(exponents_j)``: the value scaled by its bin's power of
    two. One exact product of the one-hot (with public powers of two folded in) and the
    value, then one truncation per group of bins (:func:`_groups`; one round for all);
    ``bits[k]`` bounds the value's ring magnitude when it lies in bin ``k``."""
    plan = _groups(exponents, bits)
    tops = [top for start, stop, top in plan for _ in range(start, stop)]
    factors = torch.tensor([1 << (e + t) for e, t in zip(exponents, tops)], dtype=torch.int64)
    picked = V.product(V.mul_int(onehot, factors), V.shape_op(value, "unsqueeze", -1))
    out = None
    for start, stop, top in plan:
        part = V.shape_op(V.shape_op(picked, "slice", -1, start, stop, 1), "sum", [-1], False)
        part = V.truncate(part, top) if top > 0 else V.mul_int(part, 1 << -top)
        out = part if out is None else V.add(out, part)
    return out


def reduce(a: Any, f: int) -> tuple[Any, Any, list[int]]:
    """``(onehot, u, js)``: the bins of ``a`` (exponents ``js``) and ``u = a / 4^j`` in
    [1, 4), with :data:`WIDTH` fractional bits."""
    w = WIDTH
    low, high = bins(f)
    js = list(range(low, high + 1))
    onehot = bins_of_four(a, f)
    u = select_shifted(onehot, a, [w - f - 2 * j for j in js], [2 * j + 2 + f for j in js])
    return onehot, u, js




__all__ = ["WIDTH", "bins", "bins_of_four", "reduce", "select_shifted"]
