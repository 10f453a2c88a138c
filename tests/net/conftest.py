"""Fixtures for the network tests: ``veil worker`` subprocesses that stop by themselves.

Starting a worker costs a few seconds (importing torch and veil), so tests share workers
where they can and start the ones they need in parallel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.net._util import stop_all
from veil.net import WorkerProcess, spawn_worker


@pytest.fixture
def spawn():
    """``spawn(name, **kwargs)`` starts a worker; ``spawn.many((name, kwargs), ...)`` several."""
    started: list[WorkerProcess] = []

    def start(name: str, **kwargs) -> WorkerProcess:
        proc = spawn_worker(name, **kwargs)
        started.append(proc)
        return proc

    def start_many(*specs: tuple[str, dict]) -> list[WorkerProcess]:
        with ThreadPoolExecutor(len(specs)) as pool:
            return list(pool.map(lambda s: start(s[0], **s[1]), specs))

    start.many = start_many
    yield start
    stop_all(started)


@pytest.fixture(scope="session")
def alice():
    """A worker with a token, shared by the tests that leave it as they found it."""
    with spawn_worker("alice") as proc:
        yield proc
