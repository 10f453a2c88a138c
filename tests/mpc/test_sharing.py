"""Additive sharing: splitting, reconstruction, refresh, validation, pointers, ownership."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import veil
import veil.mpc
from tests.mpc.helpers import worker_parties
from veil.mpc import AdditiveSharingTensor
from veil.workers import FetchObject


@settings(max_examples=20)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=12), st.integers(2, 5))
def test_share_and_reconstruct_local(values, n):
    x = torch.tensor(values, dtype=torch.int64)
    parties = tuple(f"p{i}" for i in range(n))  # names, whatever VEIL_TEST_PARTIES says
    s = x.share(*parties, crypto_provider="dealer")
    assert isinstance(s, AdditiveSharingTensor)
    assert len(s.shares) == n
    assert torch.equal(s.get(), x)


@pytest.mark.parametrize("n", [2, 3])
def test_share_over_workers_each_holds_one_uniform_share(n):
    parties, provider = worker_parties(n)
    x = torch.arange(64, dtype=torch.int64)
    s = x.share(*parties, crypto_provider=provider)
    for share, party in zip(s.shares, parties):
        assert type(share) is veil.PointerTensor and share.location is party
        assert not torch.equal(share.get(), x)
    assert torch.equal(s.get(), x)
    # a share of a constant tensor looks uniform: no repeated values among 64
    assert len(set(s.shares[0].get().tolist())) == 64


def test_refresh_changes_shares_not_value():
    parties, provider = worker_parties(2)
    x = torch.tensor([1, -2, 3], dtype=torch.int64)
    s = x.share(*parties, crypto_provider=provider)
    old = [p.get() for p in s.shares]
    r = s.refresh()
    assert torch.equal(r.get(), x)
    assert not any(torch.equal(a, b.get()) for a, b in zip(old, r.shares))
    f = torch.tensor([0.5]).fix_precision().share("a", "b", crypto_provider="c").refresh()
    assert f.get().float_precision().item() == 0.5


def test_validation_errors():
    x = torch.tensor([1, 2])
    with pytest.raises(veil.ProtocolError, match="at least 2"):
        x.share("alice")
    with pytest.raises(veil.ProtocolError, match="more than once"):
        x.share("alice", "alice")
    with pytest.raises(veil.ProtocolError, match="provider"):
        x.share("alice", "bob", crypto_provider="alice")
    w = veil.VirtualWorker("w")
    with pytest.raises(veil.ProtocolError, match="all be workers"):
        x.share(w, "bob")
    with pytest.raises(veil.ProtocolError, match="int64"):
        torch.tensor([1.5]).share("a", "b")
    s = x.share("a", "b", crypto_provider="c")
    with pytest.raises(veil.ProtocolError, match="already shared"):
        s.share("a", "b")
    with pytest.raises(veil.ProtocolError, match="different parties"):
        s + x.share("a", "d")


def test_missing_provider_is_a_clear_error():
    s = torch.tensor([1.0, 2.0]).fix_precision().share("a", "b")
    assert (s + s).get().float_precision().tolist() == [2.0, 4.0]  # linear: no provider needed
    with pytest.raises(veil.ProtocolError, match="crypto provider"):
        s * s


def test_pointer_is_shared_by_its_owner_and_stays_private():
    alice, bob, carol, dave = (veil.VirtualWorker(n) for n in ("alice", "bob", "carol", "dave"))
    ptr = dave.host(torch.tensor([1.5, -2.0]), private=True)
    s = ptr.fix_precision().share(alice, bob, crypto_provider=carol)
    assert [sh.location for sh in s.child.shares] == [alice, bob]
    total = (s * s).sum()
    with pytest.raises(veil.PermissionDenied):
        total.get()
    with pytest.raises(veil.PermissionDenied):
        s.child.shares[0].get()
    allowed = dave.host(torch.tensor([1.5, -2.0]), private=True, allowed=("me",))
    t = allowed.fix_precision().share(alice, bob, crypto_provider=carol)
    assert (t * t).sum().get().float_precision().item() == 6.25


def test_int_share_of_a_pointer():
    alice, bob, carol = (veil.VirtualWorker(n) for n in ("alice", "bob", "carol"))
    ptr = torch.tensor([4, -5]).send(alice)
    s = ptr.share(alice, bob, crypto_provider=carol)
    assert s.shares[0].location is alice and s.shares[1].location is bob
    assert (s * s).get().tolist() == [16, 25]


def test_orchestrator_never_fetches_during_protocols(monkeypatch):
    parties, provider = worker_parties(2)
    fetched = []
    real = veil.VirtualWorker._send_request

    def spy(self, msg):
        if type(msg) is FetchObject:
            fetched.append((self.name, msg))
        return real(self, msg)

    monkeypatch.setattr(veil.VirtualWorker, "_send_request", spy)
    a = torch.randn(3, 4).fix_precision().share(*parties, crypto_provider=provider)
    b = torch.randn(4, 2).fix_precision().share(*parties, crypto_provider=provider)
    out = torch.relu(a @ b) * 2.5 + a.sum()
    assert fetched == []  # products, truncations and comparisons ran among the workers
    out.get()
    assert sorted(name for name, _ in fetched) == ["party0", "party1"]  # one share each


def test_serialized_workers():
    parties, provider = worker_parties(2, serialize=True)
    s = torch.tensor([0.5, -1.25]).fix_precision().share(*parties, crypto_provider=provider)
    assert (s * s + s).sum().get().float_precision().item() == pytest.approx(1.0625, abs=1e-4)


def test_repr_does_not_reveal():
    s = torch.tensor([123.0]).fix_precision().share("a", "b", crypto_provider="c")
    assert "123" not in repr(s) and "parties" in repr(s)


def test_a_failed_provider_is_named_by_the_party_that_waited_for_it():
    (alice, bob), carol = worker_parties(2)
    s = torch.tensor([1.5, 2.0]).fix_precision().share(alice, bob, crypto_provider=carol)
    broken = torch.ones(2).send(carol)
    broken.index_select(0, torch.tensor([7]).send(carol))  # fails on carol, pipelined
    cause = rf"'{carol.name}' was moving here did not come: .*index_select"
    with pytest.raises(veil.RemoteError, match=cause):
        (s * s).get()
    with pytest.raises(veil.RemoteError, match="index_select"):
        carol.flush()  # reported by carol itself
    with pytest.raises(veil.RemoteError, match="did not come"):
        bob.flush()  # bob waited for carol too; alice's error was reported above
    alice.flush()
    assert torch.allclose((s * s).get().float_precision(), torch.tensor([2.25, 4.0]))
