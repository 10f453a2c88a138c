"""Seeded dealing: the provider sends parties 0..n-2 a seed instead of a random bundle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc import _runtime, provider
from veil.mpc._random import SEED_WORDS, expand_seed, random_seed

from .helpers import dealer_values, reveal, shared, worker_parties


def test_expand_seed_is_deterministic_and_seed_dependent():
    s, t = random_seed(), random_seed()
    assert s.dtype == torch.int64 and s.numel() == SEED_WORDS
    assert torch.equal(expand_seed(s, 1000), expand_seed(s, 1000))
    assert torch.equal(expand_seed(s, 7), expand_seed(s, 1000)[:7])  # one keystream
    assert not torch.equal(expand_seed(s, 64), expand_seed(t, 64))
    assert expand_seed(s, 0).shape == (0,)
    for bad in (torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)):
        with pytest.raises(ValueError):
            expand_seed(bad, 4)
    with pytest.raises(ValueError):
        expand_seed(s, -1)


def _combine(bundles, arith_len, count, total):
    """The dealer values from seeded bundles: the seeds expanded, as the parties do, then
    recombined with the last party's bundle."""
    full = [provider.seeded_bundle(s, count, total) for s in bundles[:-1]] + [bundles[-1]]
    return dealer_values(full, arith_len)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.integers(1, 3), st.integers(1, 6), st.integers(0, 6))
def test_seeded_split_reconstructs_the_values(n, count, arith, xor):
    values = torch.randint(-(2**62), 2**62, (count, arith + xor))
    original = values.clone()
    bundles = provider.split_values(values, arith, n, seeded=True)
    assert len(bundles) == n
    assert all(b.shape == (SEED_WORDS,) for b in bundles[:-1])
    assert bundles[-1].shape == (count, arith + xor)
    assert torch.equal(_combine(bundles, arith, count, arith + xor), original)


@pytest.mark.parametrize("n", [2, 3])
def test_seeded_beaver_triples_hold(n):
    sx, sy = (3, 4), (4, 2)
    lay = provider.beaver_layout("matmul", sx, sy, (), 0)
    bundles = provider.deal_beaver("matmul", sx, sy, (), 0, n, 2, True)
    values = _combine(bundles, lay.arith_len, 2, lay.total)
    for row in values:
        p = lay.unpack(row)
        assert torch.equal(p["c"], p["a"] @ p["b"])
    with pytest.raises(Exception, match="seeded must be a bool"):
        provider.deal_beaver("matmul", sx, sy, (), 0, n, 2, 1)


def test_network_parties_get_seeds_and_in_process_ones_bundles():
    parties, prov = worker_parties(2)
    assert not _runtime.context(parties, prov).seeded
    assert not _runtime.context(("p0", "p1"), "dealer").seeded


def test_secure_computation_with_seeded_dealing_matches_plaintext():
    """In-process workers forced to seeded dealing (what network workers use): products,
    truncations, comparisons and a training step agree with plaintext, and the provider sends
    one bundle where it sent two."""
    torch.manual_seed(0)
    parties, prov = worker_parties(2)
    x, w = torch.randn(5, 4), torch.randn(4, 3)

    def run(seeded: bool) -> tuple[torch.Tensor, int]:
        ctx = _runtime.context(parties, prov)
        ctx.seeded = seeded
        ctx.pools.clear()
        xs, ws = shared(x, parties, prov), shared(w, parties, prov)
        _runtime.STATS.reset()
        out = reveal(torch.relu(xs @ ws) * xs[:, :3])
        return out, _runtime.STATS.offline_bytes

    try:
        seeded, seeded_bytes = run(True)
        plain, plain_bytes = run(False)
    finally:
        _runtime.context(parties, prov).seeded = False
    ref = (torch.relu(x @ w) * x[:, :3]).double()
    torch.testing.assert_close(seeded, ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(plain, ref, atol=1e-3, rtol=0)
    assert seeded_bytes < 0.6 * plain_bytes
