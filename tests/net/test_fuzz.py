"""A live worker fed random, truncated, mutated and oversized frames keeps answering correctly."""

from __future__ import annotations

import random
import socket

import pytest
import torch

import veil
from tests.net._util import raw_connect
from veil.net import connect
from veil.net._frames import batch_frame
from veil.serde import Ref, decode, encode
from veil.workers import (
    DeleteObjects,
    ErrorReply,
    ExecuteCommand,
    FetchObject,
    Query,
    Reply,
    SearchObjects,
    StoreObject,
    new_id,
)

pytestmark = pytest.mark.network

MAX_FRAME = 64 * 1024
FRAMES = 10_000


@pytest.fixture(scope="module")
def small_worker():
    with veil.net.spawn_worker("fuzzed", args=["--max-frame", str(MAX_FRAME)]) as proc:
        yield proc


def _valid_frames(rng: random.Random) -> list[bytes]:
    """Frames a client could send: stores, commands, fetches, searches, queries."""
    a, b = new_id(), new_id()
    msgs = [
        StoreObject(a, torch.randn(rng.randint(1, 50))),
        ExecuteCommand("torch.add", (Ref(a), 1.0), {}, b),
        ExecuteCommand("Tensor.mul", (Ref(b), Ref(a)), {}, new_id()),
        FetchObject(b),
        SearchObjects(("#x",)),
        DeleteObjects((a, b)),
        Query("count"),
    ]
    frames = [encode(m) for m in msgs]
    frames.append(batch_frame([*frames[:3], encode(Query("flush"))]))
    return frames


def _garbage(rng: random.Random, valid: list[bytes]) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(0, 2000))
    frame = rng.choice(valid)
    if kind == 1:  # truncated
        return frame[: rng.randrange(0, len(frame))]
    if kind == 2:  # a few bytes changed
        data = bytearray(frame)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    # random bytes behind a valid prefix
    return frame[: rng.randrange(len(frame))] + rng.randbytes(rng.randrange(1, 100))


def test_fuzzed_frames_then_correct_answers(small_worker):
    rng = random.Random(1234)
    url, token = small_worker.url, small_worker.token
    conn, _ = raw_connect(url, token)
    sent = answered = closed = 0
    while sent < FRAMES:
        valid = _valid_frames(rng)
        roll = rng.random()
        try:
            if roll < 0.003:  # oversized: the worker closes this connection with 1009
                conn.send(rng.randbytes(MAX_FRAME + rng.randrange(1, 5000)))
                sent += 1
                with pytest.raises(veil.LimitExceeded):
                    conn.recv()
            elif roll < 0.004:  # a text frame: closed (binary frames only)
                conn.protocol.send_text(b"hello")
                conn._write()
                sent += 1
                with pytest.raises(veil.WorkerUnavailable):
                    conn.recv()
            elif roll < 0.005:  # not even WebSocket framing, then the end of the stream
                conn.sock.sendall(rng.randbytes(rng.randrange(1, 64)))
                conn.sock.shutdown(socket.SHUT_WR)
                sent += 1
                with pytest.raises(veil.VeilError):
                    conn.recv()
            else:
                frame = _garbage(rng, valid) if roll < 0.9 else rng.choice(valid)
                conn.send(frame)
                sent += 1
                reply = decode(conn.recv())  # exactly one reply per frame, always decodable
                assert type(reply) in (Reply, ErrorReply)
                answered += 1
                continue
        except OSError as exc:  # pragma: no cover - reported with context
            pytest.fail(f"socket error after {sent} frames: {exc}")
        closed += 1
        conn.abort()
        conn, _ = raw_connect(url, token)
    conn.close()
    assert sent >= FRAMES and answered > 0.98 * FRAMES and closed > 10
    assert small_worker.alive()
    # The worker still computes correctly, and what the fuzzing sessions stored is gone.
    with connect(url, token=token, timeout=10) as w:
        x = torch.arange(10.0).send(w)
        assert torch.equal(((x * 3) - 1).get(), torch.arange(10.0) * 3 - 1)
        for _ in range(100):
            if w.object_count() == 1:
                break
            torch.ones(1).numpy()  # a little time for the last departures
        assert w.object_count() == 1
    assert "further errors" in small_worker.log()
