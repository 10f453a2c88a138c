"""Moves between network workers cost the client no round trip: the destination waits for the
object (AwaitObject) and learns of a failed move from the source (MoveFailed)."""

from __future__ import annotations

import time

import pytest
import torch

import veil
from veil.net import connect, new_token
from veil.net._process import started_workers
from veil.workers import FetchObject, new_id
from veil.workers._messages import AwaitObject, MoveFailed

pytestmark = pytest.mark.network

PEER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def workers():
    token = new_token()
    args = ["--peer-timeout", str(PEER_TIMEOUT)]
    with started_workers(
        ("alice", {"token": token, "args": args}),
        ("bob", {"token": token, "args": [*args, "--max-bytes", "1M"]}),
        ("carol", {"token": token, "args": args}),
    ) as procs:
        yield procs


@pytest.fixture
def handles(workers):
    hs = [connect(p.url, token=p.token, timeout=10) for p in workers]
    yield hs
    for h in hs:
        h.close()


def _round_trips(*ws) -> int:
    return sum(w.round_trips for w in ws)


def test_moves_cost_no_round_trip(handles):
    alice, bob, _ = handles
    x0, y0 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    x, y = x0.send(alice), y0.send(bob)
    alice.flush()
    bob.flush()
    before = _round_trips(alice, bob)
    for _ in range(5):  # moves both ways, each followed by a use of what came in
        y = y + (x * 2).move(bob)
        x = x + (y * 1).move(alice)
        x0, y0 = x0, y0 + 2 * x0
        x0 = x0 + y0
    assert _round_trips(alice, bob) == before
    assert x.get().tolist() == x0.tolist()  # the only round trip
    assert _round_trips(alice, bob) == before + 1
    assert y.get().tolist() == y0.tolist()


def test_crossing_moves_in_one_frame_each(handles):
    """alice -> bob and bob -> alice buffered at once, each followed by a use: both frames
    carry a move the other one waits for."""
    alice, bob, carol = handles
    a = torch.arange(4.0).send(alice)
    b = torch.arange(4.0).send(bob)
    c = torch.ones(4).send(carol)
    to_b, to_a = (a + 1).move(bob), (b + 2).move(alice)
    to_c = (to_b * to_a.copy().move(bob)).move(carol)  # a chain through three workers
    total = (to_c + c).move(alice) + to_a
    expected = (torch.arange(4.0) + 1) * (torch.arange(4.0) + 2) + 1 + torch.arange(4.0) + 2
    assert total.get().tolist() == expected.tolist()


def test_a_move_the_source_cannot_make_fails_at_the_destination_at_once(handles):
    alice, bob, _ = handles
    dest = new_id()
    alice._move_object(new_id(), bob, dest)  # no such object on alice
    t0 = time.monotonic()
    with pytest.raises(
        veil.ObjectNotFound,
        match=r"move failed on bob: object .* that worker 'alice' was moving here did not "
        r"come: MoveObject failed on alice: no object with id",
    ):
        bob._request(FetchObject(dest))
    assert time.monotonic() - t0 < PEER_TIMEOUT / 2
    with pytest.raises(veil.ObjectNotFound, match="MoveObject failed on alice"):
        alice.flush()
    assert (torch.ones(2).send(bob) + 1).get().tolist() == [2.0, 2.0]  # bob goes on


def test_a_move_skipped_after_an_earlier_error_reports_that_error(handles):
    alice, bob, _ = handles
    alice._move_object(new_id(), bob, new_id())  # fails: alice's session now holds an error
    moved = torch.ones(3).send(alice).move(bob)  # skipped by alice, so never delivered
    t0 = time.monotonic()
    with pytest.raises(veil.ObjectNotFound, match="was moving here did not come"):
        moved.get()
    assert time.monotonic() - t0 < PEER_TIMEOUT / 2
    with pytest.raises(veil.ObjectNotFound):
        alice.flush()


def test_a_move_over_the_destination_limit_fails_there_at_once(handles):
    alice, bob, _ = handles
    small = torch.ones(10).send(bob)
    big = torch.ones(300_000).send(alice)  # 1.2 MB: over bob's 1 MiB per client
    moved = big.move(bob)
    t0 = time.monotonic()
    with pytest.raises(veil.LimitExceeded, match=r"was moving here did not come: .*the limit is"):
        (moved + small).get()  # bob waits for the move: its delivery fails at bob
    assert time.monotonic() - t0 < PEER_TIMEOUT / 2
    with pytest.raises(veil.LimitExceeded, match="move failed on alice"):
        alice.flush()
    assert bob.object_count() == 1  # small; nothing of the move was kept
    fits = torch.ones(1000).send(alice).move(bob)  # the session goes on, under its limit
    assert (fits + small[0]).sum().item() == 2000.0


def test_an_object_that_never_comes_fails_after_the_peer_timeout(handles):
    _, bob, _ = handles
    bob._submit(AwaitObject(new_id(), "nobody"))
    t0 = time.monotonic()
    with pytest.raises(
        veil.WorkerUnavailable, match=r"worker 'nobody' was moving here did not arrive within 2 s"
    ):
        bob.flush()
    assert PEER_TIMEOUT - 0.1 < time.monotonic() - t0 < PEER_TIMEOUT + 3
    assert (torch.ones(2).send(bob) * 3).get().tolist() == [3.0, 3.0]


def test_a_move_lost_with_its_source_connection_does_not_stall_the_destination(workers):
    a, b, _ = workers
    with connect(b.url, token=b.token, timeout=10) as bob:
        alice = connect(a.url, token=a.token, timeout=10)
        moved = torch.ones(2).send(alice).move(bob)  # buffered on alice, never sent
        alice.close()
        t0 = time.monotonic()
        assert bob.object_count() == 0
        assert time.monotonic() - t0 < PEER_TIMEOUT / 2
        with pytest.raises(veil.ObjectNotFound):
            moved.get()


def test_move_signals_from_the_wrong_side_are_refused(handles):
    _, bob, _ = handles
    bob._submit(MoveFailed(new_id(), "PermissionDenied", "made up"))
    with pytest.raises(veil.ProtocolError, match="MoveFailed is sent by workers"):
        bob.flush()
    x = torch.ones(2).send(bob)
    bob._submit(AwaitObject(x.id, "bob"))  # already here: nothing to wait for
    assert (x + 1).get().tolist() == [2.0, 2.0]
