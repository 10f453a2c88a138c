"""What one client may cost a network worker, and the bookkeeping that enforces it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """A network worker's limits.

    Args:
        max_frame: largest WebSocket message accepted, in bytes (larger ones close that
            connection with code 1009; clients check before sending and raise
            :class:`veil.LimitExceeded`).
        max_objects: objects one client may hold on the worker at once.
        max_bytes: bytes of tensors one client may hold on the worker at once.
        max_clients: connections served at once (more are closed with code 1013).
        handshake_timeout: seconds a new connection has to open and authenticate.
        idle_timeout: seconds without a message after which a client is disconnected (and its
            objects released); None waits forever (dead peers are still found by TCP
            keepalive).
        peer_timeout: seconds to connect and deliver an object to another worker, and the
            longest a client's message waits here for an object moved to it (a wait ends at
            once if the source's connection is lost).
    """

    max_frame: int = 256 * MiB
    max_objects: int = 1_000_000
    max_bytes: int = 4 * GiB
    max_clients: int = 256
    handshake_timeout: float = 10.0
    idle_timeout: float | None = None
    peer_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_objects", "max_bytes", "max_clients"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_frame < 4096:
            raise ValueError("max_frame must be at least 4096 bytes")
        for name in ("handshake_timeout", "peer_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is None and name == "idle_timeout":
                continue
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    def for_client(self) -> dict[str, Any]:
        """What a client is told (in the welcome) so that it can check before sending."""
        d = asdict(self)
        return {k: d[k] for k in ("max_frame", "max_objects", "max_bytes")}


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``"1048576"``, ``"64M"``, ``"64MiB"`` or ``"2G"`` (binary units).

    Raises:
        ValueError: not a size.
    """
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 2G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def nbytes(obj: Any) -> int:
    """Bytes a stored object accounts for: tensors by their elements, sequences by their parts.

    Modules count nothing: their tensors are stored (and counted) under their own ids.
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)) and not isinstance(obj, nn.Module):
        return sum(nbytes(o) for o in obj)
    return 0


class HeldObjects(set):
    """A session's ``created`` set that also keeps the bytes its objects hold.

    The node adds an id right after storing its object, so the size is read then. ``added``
    lists the ids added since it was last cleared: the server rolls them back when a message
    takes the client over its byte limit.
    """

    def __init__(self, objects: dict[bytes, Any], ids: Iterable[bytes] = ()) -> None:
        super().__init__()
        self._objects = objects
        self._sizes: dict[bytes, int] = {}
        self.nbytes = 0
        self.added: list[bytes] = []
        for oid in ids:
            self.add(oid)

    def add(self, oid: bytes) -> None:
        if oid in self:
            return
        super().add(oid)
        size = nbytes(self._objects.get(oid))
        self._sizes[oid] = size
        self.nbytes += size
        self.added.append(oid)

    def discard(self, oid: bytes) -> None:
        if oid in self:
            super().discard(oid)
            self.nbytes -= self._sizes.pop(oid, 0)

    def remove(self, oid: bytes) -> None:
        if oid not in self:
            raise KeyError(oid)
        self.discard(oid)

    def clear(self) -> None:
        super().clear()
        self._sizes.clear()
        self.nbytes = 0
        self.added.clear()

    def pop(self) -> bytes:
        oid = super().pop()
        self.nbytes -= self._sizes.pop(oid, 0)
        return oid
