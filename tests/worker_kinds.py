"""The kinds of worker the shared test suite runs against.

Each kind is a factory ``make(names) -> list[Worker]`` used as a context manager, so that
kinds with processes (network workers) can stop them afterwards. Tests that take the
``workers`` fixture run once per kind listed in :data:`KINDS`.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import veil
from veil.net import WorkerProcess, connect, new_token, spawn_worker


@contextlib.contextmanager
def _virtual(names: tuple[str, ...]) -> Iterator[list[Any]]:
    yield [veil.VirtualWorker(n) for n in names]


@contextlib.contextmanager
def _serialized(names: tuple[str, ...]) -> Iterator[list[Any]]:
    yield [veil.VirtualWorker(n, serialize=True) for n in names]


# ------------------------------------------------------------------ websocket

#: One token for every worker of the suite, so that moves between them authenticate.
_TOKEN = new_token()
#: ``veil worker`` processes by name, started on first use and kept for the whole session
#: (starting one costs a second or two); each test gets fresh connections, and a worker is
#: only handed to the next test once it holds no objects.
_POOL: dict[str, WorkerProcess] = {}


def _processes(names: tuple[str, ...]) -> list[WorkerProcess]:
    missing = [n for n in dict.fromkeys(names) if n not in _POOL or not _POOL[n].alive()]
    if missing:
        with ThreadPoolExecutor(len(missing)) as pool:
            started = pool.map(
                lambda n: spawn_worker(n, token=_TOKEN, args=["--threads", "1"]), missing
            )
            _POOL.update(zip(missing, started))
    return [_POOL[n] for n in names]


def _settle(proc: WorkerProcess, timeout: float = 10.0) -> None:
    """Wait until the worker has released the last test's objects; restart it otherwise."""
    deadline = time.monotonic() + timeout
    with (
        contextlib.suppress(veil.VeilError),
        connect(proc.url, token=_TOKEN, timeout=timeout) as probe,
    ):
        while time.monotonic() < deadline:
            if probe.object_count() == 0:
                return
            time.sleep(0.01)
    _POOL.pop(proc.name, None)
    proc.stop()


@contextlib.contextmanager
def _websocket(names: tuple[str, ...]) -> Iterator[list[Any]]:
    procs = _processes(names)
    workers = [connect(p.url, token=_TOKEN, timeout=30) for p in procs]
    try:
        yield workers
    finally:
        for w in workers:
            w.close()
        for p in procs:
            if p.alive():
                _settle(p)


@atexit.register
def _stop_pool() -> None:
    for proc in _POOL.values():
        proc.stop()
    _POOL.clear()


KINDS: dict[str, Callable[[tuple[str, ...]], contextlib.AbstractContextManager[list[Any]]]] = {
    "virtual": _virtual,
    "serialized": _serialized,
    "websocket": _websocket,
}
