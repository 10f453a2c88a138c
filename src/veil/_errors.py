"""veil's exceptions.

Every error veil raises on purpose derives from :class:`VeilError`, so callers can catch
veil's failures without catching unrelated ones. Each subclass names one kind of failure.
"""

from __future__ import annotations


class VeilError(Exception):
    """Base class of every exception veil raises on purpose."""


class SerializationError(VeilError, ValueError):
    """Bytes could not be encoded or decoded by veil's wire format."""


class PermissionDenied(VeilError, PermissionError):
    """A worker's owner did not allow the requester to take an object."""


class CommandNotAllowed(VeilError):
    """A command named an operation that is not on the worker's allow-list."""


class ObjectNotFound(VeilError, KeyError):
    """A message referred to an object id that the worker does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "object not found"


class RemoteError(VeilError):
    """A command failed on the worker that ran it.

    ``op`` names the operation that failed and ``worker`` the worker it ran on.
    """

    def __init__(self, message: str, *, op: str | None = None, worker: str | None = None):
        super().__init__(message)
        self.op = op
        self.worker = worker


class WorkerMismatch(VeilError, ValueError):
    """Arguments of one operation live on different workers (or some are local)."""


class WorkerUnavailable(VeilError, ConnectionError):
    """A worker could not be reached, or its connection closed."""


class AuthenticationError(VeilError):
    """A connection could not prove it knows the worker's token."""


class LimitExceeded(VeilError):
    """A request went over one of a worker's configured limits."""


class PrecisionOverflow(VeilError, OverflowError):
    """A value does not fit the fixed-point range of the ring."""


class ProtocolError(VeilError):
    """A secure computation protocol was used wrongly (party count, provider, missing triple)."""


class PrivacyBudgetExceeded(VeilError):
    """A differentially private step would spend more privacy than the budget allows."""


class DatasetUnavailable(VeilError, FileNotFoundError):
    """A dataset file could not be found, downloaded or verified."""


__all__ = [
    "AuthenticationError",
    "CommandNotAllowed",
    "DatasetUnavailable",
    "LimitExceeded",
    "ObjectNotFound",
    "PermissionDenied",
    "PrecisionOverflow",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "VeilError",
    "WorkerMismatch",
    "WorkerUnavailable",
]
