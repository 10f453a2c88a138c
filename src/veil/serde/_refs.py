"""References to objects held by a worker, as they appear inside command arguments."""

from __future__ import annotations

from typing import NamedTuple


class Ref(NamedTuple):
    """The object stored under ``id`` on the worker that runs the command."""

    id: bytes


class GradRef(NamedTuple):
    """The ``.grad`` of the tensor stored under ``id`` (resolved when the command runs)."""

    id: bytes
