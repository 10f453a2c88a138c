"""The kinds of worker the shared test suite runs against.

Each kind is a factory ``make(names) -> list[Worker]`` used as a context manager, so that
kinds with processes (network workers) can stop them afterwards. Tests that take the
``workers`` fixture run once per kind listed in :data:`KINDS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import veil


@contextlib.contextmanager
def _virtual(names: tuple[str, ...]) -> Iterator[list[Any]]:
    yield [veil.VirtualWorker(n) for n in names]


@contextlib.contextmanager
def _serialized(names: tuple[str, ...]) -> Iterator[list[Any]]:
    yield [veil.VirtualWorker(n, serialize=True) for n in names]


KINDS: dict[str, Callable[[tuple[str, ...]], contextlib.AbstractContextManager[list[Any]]]] = {
    "virtual": _virtual,
    "serialized": _serialized,
}
