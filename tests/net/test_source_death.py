"""A destination waiting for a moved object stops waiting as soon as the source worker's link
into its session is lost (the source died), and goes on waiting when that link is closed
normally (the source reconnects for its next delivery)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import veil
from veil.net import connect, new_token
from veil.net._auth import normalize_token
from veil.net._peers import PeerLinks
from veil.net._process import WorkerProcess, started_workers
from veil.workers import FetchObject, StoreObject, new_id
from veil.workers._messages import AwaitObject

pytestmark = pytest.mark.network

#: Long, so that a wait ended by it cannot pass for one ended by the lost link.
PEER_TIMEOUT = 60.0
#: How soon after the source's death the destination's client must hear of it.
PROMPT = 5.0
#: Client timeouts: longer than the peer timeout, so that they cannot end a wait either.
CLIENT_TIMEOUT = PEER_TIMEOUT + 30


@pytest.fixture(scope="module")
def bob():
    args = ["--peer-timeout", str(PEER_TIMEOUT)]
    with started_workers(("bob", {"token": new_token(), "args": args})) as (proc,):
        yield proc


@pytest.fixture
def run():
    """``run(coroutine)``: its result, from an event loop in another thread (for PeerLinks)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run_(coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    yield run_
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(1) as p:
        yield p


def _wait_for_log(proc: WorkerProcess, pattern: str, start: int = 0, timeout: float = 30.0):
    """The first match of ``pattern`` in ``proc``'s log after offset ``start``, once written."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, proc.log()[start:])
        if m is not None or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def _waiting(oid: bytes) -> str:
    """The log line of a destination that has waited a while for ``oid``."""
    return rf"has waited [\d.]+ s for object {oid.hex()[:12]}"


def test_a_source_that_dies_fails_the_wait_at_once(bob, spawn):
    """SIGSTOP alice, pipeline a move from her to bob and a use of it on bob (bob waits),
    SIGKILL alice: bob's request fails within seconds, not after the peer timeout."""
    a = spawn("alice", token=bob.token, args=["--peer-timeout", str(PEER_TIMEOUT)])
    alice = connect(a.url, token=a.token, timeout=CLIENT_TIMEOUT)
    to_bob = connect(bob.url, token=bob.token, timeout=CLIENT_TIMEOUT)
    killed_at: list[float] = []
    seen: list[bool] = []
    try:
        x = torch.arange(3.0).send(alice)
        assert (x + 1).move(to_bob).get().tolist() == [1.0, 2.0, 3.0]  # the link now exists
        os.kill(a.pid, signal.SIGSTOP)
        moved = (x * 2).move(to_bob)  # goes out to the stopped alice with bob's next frame
        start = len(bob.log())

        def kill() -> None:
            seen.append(_wait_for_log(bob, _waiting(moved.id), start) is not None)
            killed_at.append(time.monotonic())
            os.kill(a.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(
            veil.WorkerUnavailable,
            match=r"move failed on bob: object [0-9a-f]+… that worker 'alice' was moving here "
            r"did not come: the connection from worker 'alice' \(.*\) was lost before it "
            r"delivered the object",
        ):
            moved.get()
        raised_at = time.monotonic()
        killer.join(10)
        assert seen == [True], "bob never logged that it was waiting for the moved object"
        assert raised_at - killed_at[0] < PROMPT
        assert raised_at - t0 < PEER_TIMEOUT / 2
        log = bob.log()[start:]
        assert "lost the connection from worker 'alice'" in log
        assert "failed 1 waiting move(s) from it" in log
        # bob lives on: the same client goes on, and a fresh one is served.
        assert bob.alive()
        assert (torch.ones(2).send(to_bob) * 3).get().tolist() == [3.0, 3.0]
        with connect(bob.url, token=bob.token, timeout=CLIENT_TIMEOUT) as fresh:
            assert (torch.ones(2).send(fresh) + 1).get().tolist() == [2.0, 2.0]
    finally:
        a.kill()  # also when stopped: SIGKILL ends a stopped process
        alice.close()
        to_bob.close()


def test_only_a_lost_link_fails_waits_and_only_for_its_own_worker(bob, run, pool):
    """Links into bob's session from 'alice' and 'carol' (in this process): bob waits for an
    object from alice; carol's link lost fails nothing; alice's link lost fails the wait."""
    token = normalize_token(bob.token)
    alice_links = PeerLinks("alice", token, timeout=30)
    carol_links = PeerLinks("carol", token, timeout=30)
    with connect(bob.url, token=bob.token, timeout=CLIENT_TIMEOUT) as client:
        try:
            for links in (alice_links, carol_links):
                run(links.deliver(client.address, StoreObject(new_id(), torch.ones(1))))
            # carol's link is lost while bob waits for alice: the wait goes on.
            first = new_id()
            client._submit(AwaitObject(first, "alice"))
            flushed = pool.submit(client.flush)
            start = len(bob.log())
            assert _wait_for_log(bob, _waiting(first), start)
            run(carol_links.close())  # aborts its connections, as a crash would
            assert _wait_for_log(bob, r"lost the connection from worker 'carol'", start)
            assert not flushed.done()
            run(alice_links.deliver(client.address, StoreObject(first, torch.full((2,), 7.0))))
            flushed.result(30)  # no error: the object came
            assert client._request(FetchObject(first)).tolist() == [7.0, 7.0]
            # alice's link is lost while bob waits for alice: the wait fails at once.
            second = new_id()
            client._submit(AwaitObject(second, "alice"))
            flushed = pool.submit(client.flush)
            start = len(bob.log())
            assert _wait_for_log(bob, _waiting(second), start)
            lost_at = time.monotonic()
            run(alice_links.close())
            with pytest.raises(
                veil.WorkerUnavailable,
                match=rf"object {second.hex()[:12]}… that worker 'alice' was moving here did "
                r"not come: the connection from worker 'alice' .* was lost",
            ):
                flushed.result(PEER_TIMEOUT)
            assert time.monotonic() - lost_at < PROMPT
            assert (torch.ones(2).send(client) * 2).get().tolist() == [2.0, 2.0]
        finally:
            run(alice_links.close())
            run(carol_links.close())


def test_a_link_closed_normally_fails_no_waiting_move(bob, run, pool):
    """The source evicts its idle link into bob's session (max_links=1) while bob waits for
    an object from it: the closing handshake tells bob it is no crash; the object then comes
    over a new link."""
    links = PeerLinks("alice", normalize_token(bob.token), timeout=30, max_links=1)
    with (
        connect(bob.url, token=bob.token, timeout=CLIENT_TIMEOUT) as client,
        connect(bob.url, token=bob.token, timeout=CLIENT_TIMEOUT) as other,
    ):
        try:
            run(links.deliver(client.address, StoreObject(new_id(), torch.ones(1))))
            oid = new_id()
            client._submit(AwaitObject(oid, "alice"))
            flushed = pool.submit(client.flush)
            start = len(bob.log())
            assert _wait_for_log(bob, _waiting(oid), start)
            # A delivery into another session evicts the link into client's session.
            run(links.deliver(other.address, StoreObject(new_id(), torch.ones(1))))
            assert _wait_for_log(bob, r"worker 'alice' .* delivering to .* disconnected", start)
            assert not flushed.done()
            run(links.deliver(client.address, StoreObject(oid, torch.full((2,), 5.0))))
            flushed.result(30)  # no error
            assert client._request(FetchObject(oid)).tolist() == [5.0, 5.0]
            assert "lost the connection" not in bob.log()[start:]
        finally:
            run(links.close())


def test_a_link_closed_for_idleness_fails_no_waiting_move(spawn, run, pool):
    """bob closes the idle link into a session that waits for an object from its worker:
    nothing fails, and the source opens a new link for the delivery."""
    idle = 3.0
    b = spawn("bob", args=["--peer-timeout", str(PEER_TIMEOUT), "--idle-timeout", str(idle)])
    links = PeerLinks("alice", normalize_token(b.token), timeout=30)
    with connect(b.url, token=b.token, timeout=CLIENT_TIMEOUT) as client:
        try:
            oid = new_id()
            start = len(b.log())
            run(links.deliver(client.address, StoreObject(new_id(), torch.ones(1))))
            client._submit(AwaitObject(oid, "alice"))
            flushed = pool.submit(client.flush)  # the client is busy, not idle, while it waits
            assert _wait_for_log(b, _waiting(oid), start)
            assert _wait_for_log(b, r"worker 'alice' .* idle for [\d.]+ s: disconnecting", start)
            assert _wait_for_log(b, r"worker 'alice' .* delivering to .* disconnected", start)
            assert not flushed.done()
            run(links.deliver(client.address, StoreObject(oid, torch.full((2,), 4.0))))
            flushed.result(30)  # no error
            assert client._request(FetchObject(oid)).tolist() == [4.0, 4.0]
            assert "lost the connection" not in b.log()[start:]
        finally:
            run(links.close())
