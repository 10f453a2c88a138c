"""The pointer and worker fast paths give what the general paths give, and fall back to them.

Multi-result commands (pointers built inline, results stored in one pass), flat lists of
Python scalars as arguments, and in-process moves between virtual workers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import veil
from veil.pointers import _tensor
from veil.serde import Ref
from veil.workers import new_id
from veil.workers._allowlist import register_function
from veil.workers._node import Session, WorkerNode
from veil.workers._store import Permission


def _nested_results(x: torch.Tensor) -> tuple[Any, ...]:
    return (x + 1, (x + 2, x + 3))


def _pair_as_list(x: torch.Tensor) -> list[torch.Tensor]:
    return [x * 2, x * 3]


register_function("veil.test_nested_results", _nested_results)
register_function("veil.test_pair_as_list", _pair_as_list)


def _expected_pointer(p: veil.PointerTensor, deps: Any) -> veil.PointerTensor:
    """What the general constructor makes for a computed result like ``p``."""
    rg = p.requires_grad
    q = veil.PointerTensor._from_remote(p.location, new_id(), p.shape, p.dtype, rg,
                                        owns=False, is_leaf=not rg)
    if rg:
        q._deps = deps
    return q


# ---------------------------------------------------------------------- several results


def test_multi_result_pointers_match_the_general_constructor(make_workers):
    alice = make_workers("alice")
    local = torch.randn(6, 4)
    x = local.clone().requires_grad_(True).send(alice)
    parts = x.split(2)
    assert type(parts) is tuple and len(parts) == 3
    assert len({p.id for p in parts} | {x.id}) == 4
    for p, want in zip(parts, local.split(2)):
        ref = _expected_pointer(p, x._deps)
        assert p.location is alice and p._owns and type(p._ref) is Ref and p._ref.id == p.id
        assert p._key == ref._key and p._is_leaf == ref._is_leaf and not p.is_leaf
        assert p._deps == ref._deps == frozenset((x.id,))
        assert torch.equal(p.detach().get(), want)
    # a named tuple of results keeps its type; an integer result has no dependencies
    top = torch.max(x, dim=1)
    assert type(top) is torch.return_types.max
    assert top.values.requires_grad and top.values._deps == frozenset((x.id,))
    assert not top.indices.requires_grad and top.indices._deps == frozenset()
    assert torch.equal(top.indices.get(), local.max(dim=1).indices)
    with torch.no_grad():
        halves = (x * 1).chunk(2)
    assert all(not h.requires_grad and h._deps == frozenset() for h in halves)


def test_multi_results_train_and_predict_grads(make_workers):
    alice = make_workers("alice")
    w = torch.ones(4, requires_grad=True).send(alice)
    a, b = (w * 2).split(2)
    (a.sum() + b.sum() * 3).backward()
    assert w.grad is not None
    assert torch.equal(w.grad.get(), torch.tensor([2.0, 2.0, 6.0, 6.0]))


def test_multi_results_keep_the_private_restriction(make_workers):
    alice = make_workers("alice")
    alice.host(torch.arange(6.0), tags=("#x",), private=True)
    (secret,) = alice.search("#x")
    for part in secret.split(3):
        with pytest.raises(veil.PermissionDenied, match="alice"):
            part.get()
    public = torch.arange(6.0).send(alice)
    assert [p.get().tolist() for p in public.split(3)] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_a_list_result_comes_back_as_a_list():
    alice = veil.VirtualWorker("alice")
    x = torch.ones(2).send(alice)
    spec = _tensor._meta.spec_of(_pair_as_list(torch.empty(2, device="meta")))
    out = _tensor._dispatch(alice, "veil.test_pair_as_list", (x._ref,), {}, spec)
    assert type(out) is list and [p.get().tolist() for p in out] == [[2.0, 2.0], [3.0, 3.0]]


def _node_with_x(session: Session) -> tuple[WorkerNode, bytes]:
    node = WorkerNode("alice")
    xid = new_id()
    node._put(xid, torch.ones(2), None, session)
    return node, xid


@pytest.mark.parametrize("track", [False, True])
def test_tuple_of_results_is_stored_like_the_general_path(track):
    session = Session("me", track=track)
    node, xid = _node_with_x(session)
    general = []
    real = node._store_results
    node._store_results = lambda *a: general.append(a) or real(*a)  # type: ignore[method-assign]
    ids = (new_id(), new_id())
    node._run("Tensor.split", (Ref(xid), 1), {}, ids, session)
    assert bool(general) == track  # a tracked session takes the general path
    assert [node.store.objects[i].tolist() for i in ids] == [[1.0], [1.0]]
    assert session.created == ({xid, *ids} if track else set())
    # a private argument makes every result private
    perm = Permission(frozenset(("alice",)), frozenset())
    node.store.perms[xid] = perm
    more = (new_id(), new_id())
    node._run("Tensor.split", (Ref(xid), 1), {}, more, session)
    assert all(node.store.perms[i] is perm for i in more)
    assert all(i not in node.store.perms for i in ids)


def test_nested_result_ids_fall_back_to_the_general_path():
    session = Session("me")
    node, xid = _node_with_x(session)
    a, b, c = new_id(), new_id(), new_id()
    node._run("veil.test_nested_results", (Ref(xid),), {}, (a, (b, c)), session)
    assert [node.store.objects[i].tolist()[0] for i in (a, b, c)] == [2.0, 3.0, 4.0]


def test_result_id_in_use_and_count_mismatch_are_refused():
    session = Session("me")
    node, xid = _node_with_x(session)
    with pytest.raises(veil.ProtocolError, match="already in use"):
        node._run("Tensor.split", (Ref(xid), 1), {}, (new_id(), xid), session)
    with pytest.raises(veil.ProtocolError, match="does not match"):
        node._run("Tensor.split", (Ref(xid), 1), {}, (new_id(),) * 3, session)
    limited = Session("me", max_objects=1)
    limited.created.add(xid)
    with pytest.raises(veil.LimitExceeded):
        node._run("Tensor.split", (Ref(xid), 1), {}, (new_id(), new_id()), limited)
    # a named tuple of results takes the general path
    ids = (new_id(), new_id())
    node._run("Tensor.max", (Ref(xid), 0), {}, ids, session)
    assert node.store.objects[ids[0]].item() == 1.0


# ---------------------------------------------------------------------- list arguments


class _CountingWalk(_tensor._Walk):
    made = 0

    def __init__(self, name: str) -> None:
        type(self).made += 1
        super().__init__(name)


def test_a_flat_list_argument_takes_the_fast_path_with_the_walks_key(make_workers, monkeypatch):
    alice = make_workers("alice")
    monkeypatch.setattr(_tensor, "_Walk", _CountingWalk)
    local = torch.arange(24.0).reshape(2, 3, 4)
    x = local.send(alice)
    for dims, view in (([0, 2], [6, 4]), ((1,), (4, 6)), ([], [24])):
        _CountingWalk.made = 0
        first = (x.sum(dims, True), x.view(view))  # the walk, which caches the signature
        second = (x.sum(dims, True), x.view(view))
        assert _CountingWalk.made <= 2  # the second pair found the walk's cache entry
        for got in (*first, *second):
            assert got.shape in (local.sum(dims, True).shape, local.view(view).shape)
        assert torch.equal(second[0].get(), local.sum(dims, True))
        assert torch.equal(second[1].get(), local.view(view))


def test_the_fast_path_sends_a_copy_of_a_list(monkeypatch):
    alice = veil.VirtualWorker("alice")
    x = torch.arange(6.0).send(alice)
    x.view([2, 3])  # cache the signature
    sent = []
    real = alice._run
    monkeypatch.setattr(alice, "_run", lambda op, a, k, r: sent.append(a) or real(op, a, k, r))
    shape = [3, 2]
    y = x.view(shape)
    shape[0] = 99
    assert sent[-1][1] == [3, 2] and sent[-1][1] is not shape
    assert y.shape == (3, 2) and y.get().shape == (3, 2)


def test_lists_that_are_not_flat_scalars_fall_back(make_workers, monkeypatch):
    alice = make_workers("alice")
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    pa, pb = a.send(alice), b.send(alice)
    monkeypatch.setattr(_tensor, "_Walk", _CountingWalk)
    for _ in range(2):
        _CountingWalk.made = 0
        assert torch.equal(torch.stack([pa, pb]).get(), torch.stack([a, b]))
        assert torch.equal(pa[(slice(0, 1), 2)].get(), a[(slice(0, 1), 2)])
        assert torch.equal(pa.permute(torch.Size([1, 0])).get(), a.permute(1, 0))
        assert _CountingWalk.made == 3  # pointers, a slice, a torch.Size: the walk each time
    with pytest.raises(veil.WorkerMismatch, match="different workers"):
        bob = make_workers("bob")
        torch.stack([pa, torch.ones(2, 3).send(bob)])


# ---------------------------------------------------------------------- moves


def test_in_process_move_matches_the_message_path():
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    messages: list[Any] = []
    real = alice._command
    alice._command = lambda msg: messages.append(msg) or real(msg)  # type: ignore[method-assign]
    for i in range(2):  # the first move opens the peer session by message
        x = torch.tensor([1.0, 2.0], requires_grad=True).send(alice)
        messages.clear()
        sent = alice.messages
        y = x.move(bob)
        assert alice.messages - sent == 2
        assert len(messages) == (1 if i == 0 else 0)
        assert x.id not in alice.node.store.objects
        stored = bob.node.store.objects[y.id]
        assert stored.requires_grad and stored.is_leaf and y.requires_grad and y.is_leaf
        assert y.id not in bob.node.store.perms
        assert torch.equal(y.get(), torch.tensor([1.0, 2.0]))
    assert alice.object_count() == 0


def test_moves_that_are_not_plain_take_the_message_path():
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    torch.ones(1).send(alice).move(bob)  # peer session open: the fast path is available
    moves = []
    real = alice._command
    alice._command = lambda msg: moves.append(msg) or real(msg)  # type: ignore[method-assign]
    # hosted data stays where it is hosted
    hosted = alice.host(torch.tensor([3.0]), tags=("#h",))
    moved = hosted.move(bob)
    assert hosted.id in alice.node.store.objects and moved.get().tolist() == [3.0]
    # private data keeps its restriction
    alice.host(torch.tensor([4.0]), tags=("#p",), private=True)
    (secret,) = alice.search("#p")
    with pytest.raises(veil.PermissionDenied, match="alice"):
        (secret * 1).move(bob).get()
    # a pending error: the move is skipped and the error surfaces at the next flush
    x = torch.ones(2).send(alice)
    x.index_select(0, torch.tensor([7]).send(alice))  # only the worker can tell: pipelined
    lost = x.move(bob)
    with pytest.raises(veil.RemoteError, match="index_select"):
        alice.flush()
    assert lost.id not in bob.node.store.objects
    # bob's client hears why, as from a network source's MoveFailed (not "no object")
    with pytest.raises(veil.RemoteError, match=r"moving here did not come: .*index_select"):
        bob.flush()
    assert sum(type(m).__name__ == "MoveObject" for m in moves) == 3
    # a serializing destination
    carol = veil.VirtualWorker("carol", serialize=True)
    for _ in range(2):
        z = torch.tensor([5.0]).send(alice).move(carol)
        assert z.get().tolist() == [5.0]


def test_a_failed_peer_store_still_blocks_later_moves():
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    torch.ones(1).send(alice).move(bob)
    taken = torch.zeros(1).send(bob)
    x = torch.ones(1).send(alice)
    alice._move_object(x.id, bob, taken.id)  # the id is in use on bob: the message path
    assert bob._peers["alice"].error is not None
    y = torch.ones(1).send(alice)
    alice._move_object(y.id, bob, new_id())  # as before: skipped by bob, freed by alice
    assert y.id not in alice.node.store.objects
    assert taken.get().tolist() == [0.0]
