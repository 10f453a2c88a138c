"""Local (two-party) truncation: ``share(..., truncation="local")``.

Checked against plaintext, against its stated failure probability ``(|z| + 1) / 2^64``, and
against the dealer's protocol (fewer rounds, no truncation material).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import veil
from veil.mpc import _runtime, sharing
from veil.mpc._random import random_int64
from veil.mpc.protocols import beaver_product, truncate
from veil.mpc.protocols.truncation import local_array
from veil.mpc.sharing import reconstruct as rec

from .helpers import ULP, reveal, shared, tensors, worker_parties


def local_ctx():
    return _runtime.context(["p0", "p1"], "dealer", truncation="local")


@settings(max_examples=25)
@given(
    values=st.lists(st.integers(-(2**30), 2**30), min_size=1, max_size=30),
    bits=st.integers(1, 40),
    scale=st.sampled_from([1, 3, -7]),
)
def test_local_truncation_is_within_one_unit(values, bits, scale):
    # |x * scale| < 2^33: a failure has probability below 2^-30 per value
    x = torch.tensor(values, dtype=torch.int64)
    got = rec(truncate(local_ctx(), sharing.split(x, 2), bits, scale))
    floor = (x * scale) >> bits
    assert bool(((got - floor) >= 0).all()) and bool(((got - floor) <= 1).all())


def test_local_array_fails_exactly_when_the_shares_wrap():
    bits = 16
    rng = np.random.default_rng(0)
    z = rng.integers(-(2**40), 2**40, size=1000)
    z0 = rng.integers(-(2**62), 2**62, size=1000)  # |z0| < 2^62: no wrap
    out = local_array(0, z0, bits) + local_array(1, z - z0, bits)
    assert np.all((out - (z >> bits) >= 0) & (out - (z >> bits) <= 1))
    # shares whose signed sum wraps: z0 near -2^63 and z1 = z - z0 past 2^63 - 1
    z = np.full(4, 2**40, dtype=np.int64)
    z0 = np.full(4, -(2**63), dtype=np.int64)
    z1 = z - z0  # wraps to -2^63 + 2^40 as int64: z0 + z1 (signed) is z - 2^64
    out = local_array(0, z0, bits) + local_array(1, z1, bits)
    assert np.all(out - (z >> bits) == -(2 ** (64 - bits)))


def test_failure_rate_matches_the_stated_bound():
    # z = 2^56: the bound (|z| + 1) / 2^64 is 2^-8; 200,000 fresh splits fail ~781 times
    n, bits = 200_000, 16
    z = torch.full((n,), 2**56, dtype=torch.int64)
    got = rec(truncate(local_ctx(), sharing.split(z, 2), bits))
    failures = int(((got - (z >> bits)).abs() > 1).sum())
    expected = n * (2**56 + 1) / 2**64
    sigma = (expected * (1 - 2**-8)) ** 0.5
    assert abs(failures - expected) < 6 * sigma


@settings(max_examples=10)
@given(m=st.integers(1, 5), k=st.integers(1, 5), p=st.integers(1, 5))
def test_local_truncating_products(m, k, p):
    ctx = local_ctx()
    a = torch.randint(-(2**24), 2**24, (m, k))
    b = torch.randint(-(2**24), 2**24, (k, p))
    got = rec(beaver_product(ctx, sharing.split(a, 2), sharing.split(b, 2), "matmul", (), 16))
    floor = (a @ b) >> 16
    assert bool(((got - floor) >= 0).all()) and bool(((got - floor) <= 1).all())


@settings(max_examples=15, deadline=None)
@given(data=st.data(), shape=st.tuples(st.integers(1, 4), st.integers(1, 4)))
def test_fixed_point_ops_match_plaintext(data, shape):
    parties, provider = worker_parties()
    x = data.draw(tensors(shape, 10.0))
    y = data.draw(tensors(shape, 10.0))
    w = data.draw(tensors((shape[-1], 3), 10.0))
    sx, sy, sw = (shared(t, parties, provider, "local") for t in (x, y, w))
    x64, y64, w64 = x.double(), y.double(), w.double()
    # products truncate once, within one unit; the tolerances allow for the inputs' rounding
    assert torch.allclose(reveal(sx * sy), x64 * y64, atol=4 * ULP)
    assert torch.allclose(reveal(sx @ sw), x64 @ w64, atol=shape[-1] * 4 * ULP + 4 * ULP)
    assert torch.allclose(reveal(sx * 0.25), x64 * 0.25, atol=2 * ULP)
    assert torch.allclose(reveal(sx / 3), x64 / 3, atol=2 * ULP)
    assert torch.allclose(reveal(sx.mean()), x64.mean(), atol=2 * ULP)
    assert torch.allclose(reveal(torch.relu(sx)), torch.relu(x64), atol=ULP)
    assert torch.allclose(reveal(sx.t()), x64.t())


def test_local_truncation_saves_rounds_and_material():
    parties, provider = worker_parties()
    x, w = torch.randn(8, 13), torch.randn(13, 32)
    stats = veil.mpc.stats()
    counts = {}
    for mode in ("dealer", "local"):
        sx, sw = (
            t.fix_precision().share(*parties, crypto_provider=provider, truncation=mode)
            for t in (x, w)
        )
        stats.reset()
        out = reveal(sx @ sw)
        counts[mode] = stats.snapshot()
        assert torch.allclose(out, x.double() @ w.double(), atol=1e-3)
        stats.reset()
        half = sx * 0.5
        _ = half.child.shares  # run the queued truncation
        assert stats.rounds == (0 if mode == "local" else 1)
    assert counts["dealer"]["rounds"] == 2 and counts["local"]["rounds"] == 1
    assert counts["local"]["offline_bytes"] < counts["dealer"]["offline_bytes"]


def test_training_with_local_truncation_matches_plaintext():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    parties, provider = worker_parties()
    secure = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    secure.load_state_dict(plain.state_dict())
    secure.fix_precision().share(*parties, crypto_provider=provider, truncation="local")
    sx, sy = (shared(t, parties, provider, "local") for t in (x, y))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (plain, secure)]
    for _ in range(5):
        for model, opt, (xb, yb) in zip((plain, secure), opts, ((x, y), (sx, sy))):
            opt.zero_grad()
            F.mse_loss(model(xb), yb).backward()
            opt.step()
    for p, q in zip(plain.parameters(), secure.parameters()):
        assert torch.allclose(reveal(q).float(), p.detach(), atol=2e-3)


def test_local_truncation_needs_two_parties_and_one_mode():
    with pytest.raises(veil.ProtocolError, match="exactly 2 parties"):
        torch.ones(2).fix_precision().share("a", "b", "c", crypto_provider="d", truncation="local")
    with pytest.raises(veil.ProtocolError, match="truncation must be one of"):
        torch.ones(2).fix_precision().share("a", "b", crypto_provider="d", truncation="fast")
    x = torch.ones(2).fix_precision().share("a", "b", crypto_provider="d", truncation="local")
    y = torch.ones(2).fix_precision().share("a", "b", crypto_provider="d")
    assert x.child.ctx is not y.child.ctx
    assert "truncation='local'" in repr(x.child.ctx)
    with pytest.raises(veil.ProtocolError, match="different truncations"):
        _ = x + y


def test_local_truncation_needs_no_provider_for_public_scalars():
    x = torch.tensor([1.5, -2.25])
    s = x.fix_precision().share("a", "b", truncation="local")
    assert torch.allclose(reveal(s * 0.5), x.double() * 0.5, atol=ULP)
    with pytest.raises(veil.ProtocolError, match="crypto provider"):
        reveal(x.fix_precision().share("a", "b") * 0.5)


def test_local_truncation_step_checks_its_arguments():
    from veil.mpc.protocols.truncation import trunc_local

    z = random_int64((3,))
    with pytest.raises(veil.ProtocolError, match="parties 0 and 1"):
        trunc_local(2, z, 1, 16)
    with pytest.raises(veil.ProtocolError, match="bits"):
        trunc_local(0, z, 1, 64)
