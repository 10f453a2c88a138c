"""The protocols on raw shares: Beaver products, truncation and the sign, for 2, 3, 5 parties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc import _runtime, sharing
from veil.mpc._random import random_int64
from veil.mpc.protocols import beaver_product, sign, truncate
from veil.mpc.provider import FUSED_MAX

PARTIES = [2, 3, 5]


def ctx_of(n: int):
    return _runtime.context([f"p{i}" for i in range(n)], "dealer")


def split(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return sharing.split(x, n)


def rec(shares) -> torch.Tensor:
    return sharing.reconstruct(shares)


@pytest.mark.parametrize("n", PARTIES)
@settings(max_examples=10)
@given(m=st.integers(1, 5), k=st.integers(1, 5), p=st.integers(1, 5))
def test_beaver_products_are_exact(n, m, k, p):
    ctx = ctx_of(n)
    a, b = random_int64((m, k)), random_int64((k, p))
    assert torch.equal(rec(beaver_product(ctx, split(a, n), split(b, n), "matmul")), a @ b)
    c = random_int64((m, k))
    assert torch.equal(rec(beaver_product(ctx, split(a, n), split(c, n))), a * c)
    row = random_int64((1, k))
    assert torch.equal(rec(beaver_product(ctx, split(a, n), split(row, n))), a * row)


@pytest.mark.parametrize("n", PARTIES)
def test_beaver_convolutions_are_exact(n):
    ctx = ctx_of(n)
    x, w = random_int64((2, 3, 6, 5)), random_int64((4, 3, 3, 2))
    params = ((1, 2), (1, 0), (1, 1), 1)
    got = rec(beaver_product(ctx, split(x, n), split(w, n), "conv2d", params))
    assert torch.equal(got, torch.nn.functional.conv2d(x, w, None, *params))


@pytest.mark.parametrize("n", PARTIES)
@settings(max_examples=10)
@given(
    values=st.lists(st.integers(-(2**60), 2**60), min_size=1, max_size=30), bits=st.integers(1, 40)
)
def test_truncation_within_one_unit(n, values, bits):
    x = torch.tensor(values, dtype=torch.int64)
    got = rec(truncate(ctx_of(n), split(x, n), bits))
    floor = x >> bits
    assert bool(((got - floor) >= 0).all()) and bool(((got - floor) <= 1).all())


def test_truncation_is_unbiased():
    x = torch.full((20000,), 3, dtype=torch.int64)  # 3 / 4 = 0.75
    got = rec(truncate(ctx_of(2), split(x, 2), 2)).double()
    assert abs(float(got.mean()) - 0.75) < 0.02


def test_truncation_with_scale_and_addend():
    ctx = ctx_of(3)
    x = torch.tensor([1000, -1000, 7], dtype=torch.int64)
    plus = torch.tensor([5, 5, 5])
    got = rec(truncate(ctx, split(x, 3), 4, scale=3, add=[plus, None, None]))
    exact = (x * 3).double() / 16 + 5
    assert float((got.double() - exact).abs().max()) < 1


EDGES = [0, 1, -1, 2**62 - 1, -(2**62), -(2**62) + 1, 2**61, -(2**61), 12345, -12345]


@pytest.mark.parametrize("n", PARTIES)
@settings(max_examples=10)
@given(values=st.lists(st.integers(-(2**62), 2**62 - 1), min_size=1, max_size=40))
def test_sign_and_relu_are_exact(n, values):
    x = torch.tensor(values + EDGES, dtype=torch.int64)
    ctx = ctx_of(n)
    assert torch.equal(rec(sign(ctx, split(x, n))), (x >= 0).long())
    s, r = sign(ctx, split(x, n), relu=True)
    assert torch.equal(rec(s), (x >= 0).long())
    assert torch.equal(rec(r), torch.relu(x))


def test_sign_of_many_values_any_shape():
    x = random_int64((7, 11, 13)) >> 2  # |x| < 2^62
    ctx = ctx_of(2)
    assert torch.equal(rec(sign(ctx, split(x, 2))), (x >= 0).long())


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("numel", [FUSED_MAX, FUSED_MAX + 1])
def test_sign_and_relu_on_both_sides_of_the_fused_limit(n, numel):
    # up to FUSED_MAX values the last tree level opens into arithmetic shares (6 rounds),
    # above it the final bit is converted in a round of its own (7 rounds)
    x = random_int64((numel,)) >> 2
    x[: len(EDGES)] = torch.tensor(EDGES)
    ctx = ctx_of(n)
    _runtime.STATS.reset()
    s, r = sign(ctx, split(x, n), relu=True)
    assert _runtime.STATS.rounds == (6 if numel <= FUSED_MAX else 7)
    assert torch.equal(rec(s), (x >= 0).long())
    assert torch.equal(rec(r), torch.relu(x))
    assert torch.equal(rec(sign(ctx, split(x, n))), (x >= 0).long())


def test_stats_count_rounds_and_bytes():
    # Parties of its own: the dealer pools of ctx_of(2) hold whatever earlier tests left.
    ctx = _runtime.context(["stats0", "stats1"], "stats-dealer")
    _runtime.STATS.reset()
    x = random_int64((10,)) >> 2
    sign(ctx, split(x, 2))
    assert _runtime.STATS.rounds > 0 and _runtime.STATS.online_bytes > 0
    assert _runtime.STATS.offline_bytes > 0 and _runtime.STATS.dealer_calls == 1
