"""The messages a worker understands and the replies it gives.

Each message is a small dataclass registered with the wire format under a fixed code; its
``validate()`` runs after decoding so that a worker never acts on a field of the wrong type.
Messages that need no answer (store, delete, execute, move) can be pipelined: a worker
answers only the messages that ask for a reply (fetch, search, query, a flush).

Two messages order worker-to-worker moves between network workers (:mod:`veil.net`): a client
puts an :class:`AwaitObject` in the destination's stream right where the moved object is
first needed, and a source worker that cannot carry out a move tells the destination with a
:class:`MoveFailed` (sent over its worker-to-worker link, never by clients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from veil._errors import SerializationError
from veil.serde import register_message

ID_BYTES = 16


def _check_id(value: Any, what: str = "id") -> None:
    if type(value) is not bytes or len(value) != ID_BYTES:
        raise SerializationError(f"{what} must be {ID_BYTES} bytes")


def _check_str_tuple(value: Any, what: str) -> None:
    if not isinstance(value, (tuple, list)) or not all(type(v) is str for v in value):
        raise SerializationError(f"{what} must be a sequence of strings")


def _check_result_ids(value: Any) -> None:
    """Result ids: an id, None (result not kept), or a tuple/list of those (nested)."""
    if value is None:
        return
    if type(value) is bytes:
        _check_id(value, "result id")
        return
    if isinstance(value, (tuple, list)):
        for v in value:
            _check_result_ids(v)
        return
    raise SerializationError("result ids must be ids, None, or sequences of them")


@register_message(1)
@dataclass(slots=True)
class StoreObject:
    """Store ``value`` under ``id``. ``private``/``allowed`` restrict who may fetch it."""

    id: bytes
    value: Any
    tags: tuple[str, ...] = ()
    description: str = ""
    private: bool = False
    allowed: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()

    def validate(self) -> None:
        _check_id(self.id)
        _check_str_tuple(self.tags, "tags")
        _check_str_tuple(self.allowed, "allowed")
        _check_str_tuple(self.owners, "owners")
        if type(self.description) is not str or type(self.private) is not bool:
            raise SerializationError("description must be a str and private a bool")


@register_message(2)
@dataclass(slots=True)
class FetchObject:
    """Ask for the value stored under ``id`` (checked against its permission)."""

    id: bytes
    grad: bool = False

    def validate(self) -> None:
        _check_id(self.id)
        if type(self.grad) is not bool:
            raise SerializationError("grad must be a bool")


@register_message(3)
@dataclass(slots=True)
class DeleteObjects:
    """Forget the objects stored under ``ids`` (unknown ids are ignored)."""

    ids: tuple[bytes, ...]

    def validate(self) -> None:
        if not isinstance(self.ids, (tuple, list)):
            raise SerializationError("ids must be a sequence")
        for i in self.ids:
            _check_id(i)


@register_message(4)
@dataclass(slots=True)
class ExecuteCommand:
    """Run the allow-listed operation ``op`` and store its results under ``result_ids``.

    ``args`` and ``kwargs`` may contain :class:`~veil.serde.Ref` and
    :class:`~veil.serde.GradRef` values naming stored objects. ``grad`` is the caller's
    grad mode: False runs the operation under ``torch.no_grad()`` (an optimizer's step).
    """

    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result_ids: Any
    grad: bool = True

    def validate(self) -> None:
        if type(self.op) is not str or type(self.grad) is not bool:
            raise SerializationError("op must be a str and grad a bool")
        if not isinstance(self.args, (tuple, list)) or not isinstance(self.kwargs, dict):
            raise SerializationError("args must be a sequence and kwargs a mapping")
        _check_result_ids(self.result_ids)


@register_message(5)
@dataclass(slots=True)
class SearchObjects:
    """List the objects whose tags include every tag in ``tags``."""

    tags: tuple[str, ...]

    def validate(self) -> None:
        _check_str_tuple(self.tags, "tags")


@register_message(6)
@dataclass(slots=True)
class MoveObject:
    """Send the object under ``id`` to ``destination`` (stored there as ``new_id``)."""

    id: bytes
    destination: str
    new_id: bytes

    def validate(self) -> None:
        _check_id(self.id)
        _check_id(self.new_id, "new id")
        if type(self.destination) is not str:
            raise SerializationError("destination must be a str")


@register_message(7)
@dataclass(slots=True)
class Query:
    """A question about stored objects: ``what`` is one of :data:`QUERIES`."""

    what: str
    ids: tuple[bytes, ...] = ()

    def validate(self) -> None:
        if self.what not in QUERIES:
            raise SerializationError(f"unknown query {self.what!r}")
        if not isinstance(self.ids, (tuple, list)):
            raise SerializationError("ids must be a sequence")
        for i in self.ids:
            _check_id(i)


#: ``grads``: which of ``ids`` have a ``.grad``; ``meta``: shape, dtype and requires_grad of
#: ``ids``; ``count``: how many objects the worker holds; ``flush``: nothing, but errors of
#: earlier pipelined commands surface.
QUERIES = frozenset({"grads", "meta", "count", "flush"})


@register_message(8)
@dataclass(slots=True)
class StoreModule:
    """Build an allow-listed module from ``spec`` and store it and its tensors.

    ``state`` maps each parameter and buffer name to its value; ``ids`` maps the same
    names to the ids they are stored under, and ``id`` names the module itself.
    """

    id: bytes
    spec: Any
    state: dict[str, Any]
    ids: dict[str, bytes]

    def validate(self) -> None:
        _check_id(self.id)
        if not isinstance(self.state, dict) or not isinstance(self.ids, dict):
            raise SerializationError("state and ids must be mappings")
        for v in self.ids.values():
            _check_id(v)


@register_message(9)
@dataclass(slots=True)
class Batch:
    """Several messages in one frame, handled in order."""

    messages: list[Any] = field(default_factory=list)

    def validate(self) -> None:
        if not isinstance(self.messages, (tuple, list)):
            raise SerializationError("messages must be a sequence")


@register_message(10)
@dataclass(slots=True)
class AwaitObject:
    """Wait (up to the worker's peer timeout) until the object that worker ``source`` is
    moving here arrives as ``id``; the move's failure, reported by the source, fails here too,
    and so does the loss of the source's connection into this session (the source died)."""

    id: bytes
    source: str

    def validate(self) -> None:
        _check_id(self.id)
        if type(self.source) is not str:
            raise SerializationError("source must be a str")


@register_message(11)
@dataclass(slots=True)
class MoveFailed:
    """From a source worker: the move that was to store ``id`` here failed with the error
    ``kind`` (a veil exception class name) and ``message``."""

    id: bytes
    kind: str
    message: str

    def validate(self) -> None:
        _check_id(self.id)
        if type(self.kind) is not str or type(self.message) is not str:
            raise SerializationError("kind and message must be strings")


@register_message(20)
@dataclass(slots=True)
class Reply:
    """A successful answer carrying ``value``."""

    value: Any = None


@register_message(21)
@dataclass(slots=True)
class ErrorReply:
    """A failure: ``kind`` names the veil exception class, ``op`` the failing operation."""

    kind: str
    message: str
    op: str | None = None

    def validate(self) -> None:
        if type(self.kind) is not str or type(self.message) is not str:
            raise SerializationError("kind and message must be strings")
        if self.op is not None and type(self.op) is not str:
            raise SerializationError("op must be a str or None")

    def reason(self, worker: str) -> str:
        """This failure as said of ``worker``: ``"<op> failed on <worker>: <message>"``."""
        return f"{self.op} failed on {worker}: {self.message}" if self.op else self.message


def moving_here(oid: bytes, source: str) -> str:
    """How a destination names an object that worker ``source`` is moving to it."""
    return f"object {oid.hex()[:12]}… that worker {source!r} was moving here"


@dataclass(slots=True)
class ObjectInfo:
    """What a search returns for one object (sent as a plain list)."""

    id: bytes
    shape: tuple[int, ...]
    dtype: Any
    requires_grad: bool
    tags: tuple[str, ...]
    description: str


CLIENT_MESSAGES = (StoreObject, FetchObject, DeleteObjects, ExecuteCommand, SearchObjects,
                   MoveObject, Query, StoreModule, Batch, AwaitObject)
