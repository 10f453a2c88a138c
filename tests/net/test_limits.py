"""Limits: over one, that client gets veil.LimitExceeded and the worker keeps serving everyone."""

from __future__ import annotations

import time

import pytest
import torch

import veil
from tests.net._util import raw_connect
from veil.net import Limits, connect, parse_size
from veil.net._process import started_workers

pytestmark = pytest.mark.network

MAX_FRAME = 1 << 20  # 1 MiB
MAX_OBJECTS = 50
MAX_BYTES = 4 << 20  # 4 MiB


@pytest.fixture(scope="module")
def workers():
    """A worker with small memory limits, and one with few clients and a short idle timeout."""
    args = ["--max-frame", "1M", "--max-objects", str(MAX_OBJECTS), "--max-bytes", "4M"]
    strict = ["--max-clients", "3", "--idle-timeout", "1"]
    with started_workers(("limited", {"args": args}), ("limited", {"args": strict})) as procs:
        yield procs


@pytest.fixture
def limited(workers):
    return workers[0]


@pytest.fixture
def strict(workers):
    return workers[1]


def _connect(proc, **kw):
    return connect(proc.url, token=proc.token, timeout=10, **kw)


def test_frame_limit_is_checked_before_sending(limited):
    with _connect(limited) as w, _connect(limited) as other:
        assert w.limits["max_frame"] == MAX_FRAME
        with pytest.raises(veil.LimitExceeded, match="frame limit"):
            torch.zeros(MAX_FRAME // 4 + 10).send(w)  # one tensor over the frame limit
        # Many small messages that together exceed a frame go in several frames.
        ptrs = [torch.zeros(30_000).send(w) for _ in range(20)]  # 20 x 120 kB
        w.flush()
        assert w.frames >= 3 and sum(p.sum().item() for p in ptrs) == 0.0
        del ptrs
        assert (torch.ones(1).send(other) + 1).get().item() == 2.0


def test_an_oversized_frame_closes_only_that_connection(limited):
    with _connect(limited) as other:
        conn, _ = raw_connect(limited.url, limited.token)
        conn.send(b"\x00" * (MAX_FRAME + 1))
        with pytest.raises(veil.LimitExceeded, match="1009"):
            conn.recv()
        assert (torch.ones(2).send(other) * 2).get().tolist() == [2.0, 2.0]


def test_object_limit(limited):
    with _connect(limited) as w, _connect(limited) as other:
        keep = [torch.ones(1).send(w) for _ in range(MAX_OBJECTS)]
        w.flush()
        extra = torch.ones(1).send(w)
        with pytest.raises(veil.LimitExceeded, match=f"the limit is {MAX_OBJECTS}"):
            w.flush()
        # Other clients have their own budget; this one can go on once it frees objects.
        assert (torch.ones(1).send(other) * 3).get().item() == 3.0
        del keep[:10], extra
        assert (keep[-1] + 1).get().item() == 2.0


def test_byte_limit_rolls_back_the_message_that_went_over(limited):
    with _connect(limited) as w, _connect(limited) as other:
        parts = [torch.ones(160_000).send(w) for _ in range(5)]  # 5 x 640 kB
        w.flush()
        count = w.object_count()
        whole = torch.cat(parts)  # would take the client from 3.2 MB to 6.4 MB
        with pytest.raises(veil.LimitExceeded, match="bytes"):
            w.flush()
        assert w.object_count() == count  # the result was not kept
        assert other.object_count() == count
        del whole
        assert parts[0][:3].get().tolist() == [1.0, 1.0, 1.0]
        assert (torch.ones(1).send(other) + 4).get().item() == 5.0


def test_client_limit_and_idle_timeout(strict):
    clients = [_connect(strict) for _ in range(3)]
    with pytest.raises(veil.WorkerUnavailable, match="too many clients"):
        _connect(strict)
    for c in clients:
        c.close()
    w = _connect(strict)
    x = torch.ones(1).send(w)
    w.flush()
    time.sleep(2.0)  # over the idle timeout: disconnected, objects released
    with pytest.raises(veil.WorkerUnavailable, match="idle"):
        x.get()
    with _connect(strict) as again:
        assert again.object_count() == 0


def test_limits_are_validated():
    assert parse_size("64M") == 64 << 20 and parse_size("2GiB") == 2 << 30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError):
        Limits(max_frame=10)
    with pytest.raises(ValueError):
        Limits(max_objects=0)
    with pytest.raises(ValueError):
        Limits(idle_timeout=-1)
