"""Deferred products and truncations: run together, in shared rounds, exactly as alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import veil
from veil.mpc import _runtime, sharing
from veil.mpc._random import random_int64
from veil.mpc.protocols import batch

from .helpers import F, reveal, shared, worker_parties

PARTIES = [2, 3]


def ctx_of(n: int):
    return _runtime.context([f"p{i}" for i in range(n)], "dealer")


@pytest.mark.parametrize("n", PARTIES)
@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 4), k=st.integers(1, 4), p=st.integers(1, 4), bits=st.integers(1, 20))
def test_a_batch_of_products_and_truncations_is_exact(n, m, k, p, bits):
    ctx = ctx_of(n)
    a, b, c = random_int64((m, k)), random_int64((k, p)), random_int64((m, k))
    add = random_int64((m, p))
    small = random_int64((m, k)) >> 12  # |3x| < 2^53: in truncation's range, exact as double
    ops = [
        batch.queue_product(ctx, sharing.split(a, n), sharing.split(b, n), "matmul", (), 0, None),
        batch.queue_product(ctx, sharing.split(a, n), sharing.split(c, n), "mul", (), 0, None),
        batch.queue_product(
            ctx, sharing.split(a, n), sharing.split(b, n), "matmul", (), 0, sharing.split(add, n)
        ),
        batch.queue_truncation(ctx, sharing.split(small, n), bits, 3, None),
    ]
    _runtime.STATS.reset()
    batch.flush(ctx)
    assert _runtime.STATS.rounds == 1  # no product truncates: one exchange for all four
    rec = [sharing.reconstruct(op.result) for op in ops]
    assert torch.equal(rec[0], a @ b)
    assert torch.equal(rec[1], a * c)
    assert torch.equal(rec[2], a @ b + add)
    exact = (small * 3).double() / 2**bits
    assert ((rec[3].double() - exact).abs() < 1).all()


def test_independent_fixed_point_products_share_their_rounds():
    parties, provider = worker_parties(2)
    x = torch.randn(4, 5)
    w1, w2 = torch.randn(5, 3), torch.randn(5, 2)
    sx, s1, s2 = (shared(t, parties, provider) for t in (x, w1, w2))
    _runtime.STATS.reset()
    y1, y2 = sx @ s1, sx @ s2  # queued: nothing runs yet
    assert _runtime.STATS.rounds == 0
    assert y1.child.pending is not None
    out1, out2 = reveal(y1), reveal(y2)
    assert _runtime.STATS.rounds == 2  # both products and truncations in two rounds
    assert torch.allclose(out1, (x @ w1).double(), atol=40 * 2.0**-F)
    assert torch.allclose(out2, (x @ w2).double(), atol=40 * 2.0**-F)


def test_optimizer_step_truncates_all_parameters_in_one_round():
    parties, provider = worker_parties(2)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model.load_state_dict(plain.state_dict())
    model.fix_precision().share(*parties, crypto_provider=provider)
    xs, ys = torch.randn(6, 3), torch.randn(6, 1)
    for net, x, y in ((plain, xs, ys), (model, shared(xs, parties, provider),
                                        shared(ys, parties, provider))):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        _runtime.STATS.reset()
        opt.step()
        if net is model:
            params = list(model.parameters())
            before = _runtime.STATS.rounds
            pending = [p.child.pending for p in params]
            assert all(op is not None for op in pending)
            _ = params[0].child.shares  # runs the whole queue
            assert _runtime.STATS.rounds - before == 1
            assert all(p.child.pending is None for p in params)
    for p, q in zip(plain.parameters(), model.parameters()):
        assert torch.allclose(reveal(q).float(), p.detach(), atol=1e-3)


def test_plans_are_checked_by_the_parties():
    specs = (
        ("t", (2,), 16, 1, False, False),
        ("t", (2, 3), 16, 1, True, True),
        ("b", "matmul", (2, 3), (3, 4), (), 16, True),
    )
    assert batch.parse_plan(batch.plan_text(specs)) == specs
    bad_plans = ("", "[]", "{}", '[["x"]]', '[["b", 1]]', '[["t", [2]]]', "not json")
    for bad in (
        *bad_plans,
        '[["t", [2], 16, 1, true, false]]',  # a transposed 1-D input
        '[["t", [2], 16, 1, false]]',  # no local flag
        '[["t", [2], 16, 1, false, 1]]',  # a local flag that is not a bool
        '[["b", "mul", [2], [2], [], 16]]',  # no local flag
        '[["b", "mul", [2], [2], [], 16, "yes"]]',
    ):
        with pytest.raises(veil.ProtocolError):
            batch.parse_plan(bad)
    with pytest.raises(veil.ProtocolError):
        batch.batch_mask(
            0, batch.plan_text((("t", (2,), 16, 1, False, False),)), torch.zeros(2)
        )
