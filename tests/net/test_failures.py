"""Dead workers, dropped connections, reconnecting, and the release of departed clients' objects."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil
from tests.net._util import free_port, raw_connect
from veil.net import connect

pytestmark = pytest.mark.network

TIMEOUT = 3.0


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1)
    )


def _train_until_error(
    w, stop_after: float, training: threading.Event
) -> tuple[BaseException | None, int]:
    data = veil.datasets.boston()
    batches = [
        (data.x_train[i : i + 8].send(w), data.y_train[i : i + 8].send(w)) for i in range(0, 404, 8)
    ]
    model = _mlp().send(w)
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    steps = 0
    deadline = time.monotonic() + stop_after
    try:
        while time.monotonic() < deadline:
            for xb, yb in batches:
                opt.zero_grad()
                F.mse_loss(model(xb), yb).backward()
                opt.step()
                steps += 1
                if steps == 5:
                    training.set()
    except veil.VeilError as exc:
        return exc, steps
    return None, steps


def test_kill_9_during_training_gives_worker_unavailable_within_the_timeout(spawn):
    proc = spawn("victim")
    w = connect(proc.url, token=proc.token, timeout=TIMEOUT)
    killed_at: list[float] = []
    training = threading.Event()

    def kill() -> None:
        training.wait(60)
        time.sleep(0.3)
        killed_at.append(time.monotonic())
        os.kill(proc.pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    exc, steps = _train_until_error(w, 60, training)
    raised_at = time.monotonic()
    assert isinstance(exc, veil.WorkerUnavailable), exc
    assert steps > 5 and raised_at - killed_at[0] < TIMEOUT
    with pytest.raises(veil.WorkerUnavailable, match="closed"):
        torch.ones(1).send(w).get()  # the handle stays closed, and says so
    with pytest.raises(veil.WorkerUnavailable):
        connect(proc.url, token=proc.token, timeout=TIMEOUT)  # nothing listens any more


def test_a_frozen_worker_gives_worker_unavailable_after_the_timeout(spawn):
    proc = spawn("frozen")
    w = connect(proc.url, token=proc.token, timeout=TIMEOUT)
    x = torch.ones(3).send(w)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(veil.WorkerUnavailable, match="did not answer within"):
            (x + 1).get()
        assert TIMEOUT - 0.1 < time.monotonic() - t0 < TIMEOUT + 2
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_reconnect_after_the_worker_restarts(spawn):
    port = free_port()
    proc = spawn("phoenix", args=["--port", str(port)])
    w = connect(proc.url, token=proc.token, timeout=TIMEOUT)
    old = torch.ones(2).send(w)
    assert proc.stop() == 0  # SIGTERM: a clean shutdown
    assert "stopped" in proc.log()
    with pytest.raises(veil.WorkerUnavailable):
        old.get()
    again = spawn("phoenix", token=proc.token, args=["--port", str(port)])
    assert again.url == proc.url
    w.reconnect()
    assert w.connected and torch.equal((torch.ones(2).send(w) * 5).get(), torch.full((2,), 5.0))
    with pytest.raises(veil.ObjectNotFound):
        old.get()  # the old session's objects died with the old worker
    with connect(again.url, token=again.token, timeout=TIMEOUT) as fresh:
        assert fresh.name == "phoenix"
    w.close()


def _count_until(w, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := w.object_count()) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def test_objects_of_departed_clients_are_released_hosted_data_stays(spawn, tmp_path):
    csv = tmp_path / "h.csv"
    csv.write_text("1,2\n3,4\n")
    proc = spawn("keeper", args=["--data", f"h={csv}"])
    observer = connect(proc.url, token=proc.token, timeout=TIMEOUT)
    assert observer.object_count() == 1  # the hosted table
    # A client that leaves politely...
    polite = connect(proc.url, token=proc.token, timeout=TIMEOUT)
    model = nn.Linear(4, 2).send(polite)
    kept = [torch.randn(100).send(polite) for _ in range(5)]
    polite.flush()
    assert observer.object_count() == 1 + 3 + 5
    polite.close()
    assert _count_until(observer, 1) == 1
    # ...and one whose connection just drops (as when its process is killed).
    conn, _ = raw_connect(proc.url, proc.token)
    rude = connect(proc.url, token=proc.token, timeout=TIMEOUT)
    (hosted,) = rude.search("#h")
    derived = [hosted * i for i in range(4)]
    rude.flush()
    assert observer.object_count() == 1 + 4
    rude._conn.sock.close()  # no close frame, no goodbye
    assert _count_until(observer, 1) == 1
    conn.abort()
    assert len(observer.search("#h")) == 1
    assert "released 8 objects" in proc.log() and "released 4 objects" in proc.log()
    del model, kept, derived


def test_connecting_to_nothing_fails_at_once():
    t0 = time.monotonic()
    with pytest.raises(veil.WorkerUnavailable, match="cannot connect"):
        connect(f"ws://127.0.0.1:{free_port()}", timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT


def test_a_refusal_read_together_with_the_handshake_names_its_reason():
    """A worker serving too many clients accepts the WebSocket and closes it at once; when
    the client reads the handshake response and the close frame in one go, it must still
    report the worker's reason (it used to say 'handshake failed: None')."""
    import base64
    import hashlib
    import socket
    import struct

    from veil.net._conn import BlockingConnection

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key")
            )
            magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            accept = base64.b64encode(hashlib.sha1(key + magic).digest())
            response = (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            reason = b"too many clients"
            payload = struct.pack("!H", 1013) + reason
            close = bytes([0x88, len(payload)]) + payload
            conn.sendall(response + close)  # one write: both arrive in one read
            time.sleep(0.5)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(veil.WorkerUnavailable, match="too many clients"):
            BlockingConnection(
                f"ws://127.0.0.1:{port}", timeout=TIMEOUT, ssl_context=None, max_size=None
            )
    finally:
        thread.join(TIMEOUT)
        server.close()
