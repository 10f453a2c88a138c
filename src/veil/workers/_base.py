"""The client's handle on a worker: what the orchestrator calls to use one.

:class:`Worker` is the extension point for transports. A subclass provides :meth:`_submit`
(send a message that has no reply, possibly buffered) and :meth:`_request` (send a message and
wait for its reply, flushing anything buffered first). Everything else (sending tensors and
models, searching, hosting, garbage collection of remote objects) is built on those two.
"""

from __future__ import annotations

import os
import weakref
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from veil import _errors
from veil._errors import RemoteError, WorkerUnavailable
from veil.workers._messages import (
    DeleteObjects,
    ErrorReply,
    ExecuteCommand,
    MoveObject,
    Query,
    Reply,
    SearchObjects,
    StoreObject,
)

if TYPE_CHECKING:
    from veil.pointers import PointerTensor

#: Pointers that are garbage collected queue their ids; deletes are sent in batches this big.
GC_BATCH = 64


class LeafTable:
    """The live leaf pointers (tensors that require grad) on one worker, by object id.

    What a backward may give a ``.grad``. Like a ``WeakValueDictionary`` but cheap to walk
    (a ``WeakValueDictionary`` guards every iteration, which a training step pays per batch).
    """

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[bytes, weakref.ref[PointerTensor]] = {}

    def add(self, oid: bytes, pointer: PointerTensor) -> None:
        refs = self._refs

        def forget(ref: weakref.ref[PointerTensor], oid: bytes = oid) -> None:
            if refs.get(oid) is ref:
                del refs[oid]

        refs[oid] = weakref.ref(pointer, forget)

    def items(self) -> list[tuple[bytes, PointerTensor]]:
        """(id, pointer) of the leaves alive now."""
        out = []
        for oid, ref in list(self._refs.items()):
            p = ref()
            if p is not None:
                out.append((oid, p))
        return out

    def __len__(self) -> int:
        return len(self._refs)


#: Ids drawn ahead from the OS CSPRNG (one system call per 256 ids instead of one per id).
_IDS: list[bytes] = []
_ID_BLOCK = 256


def new_id() -> bytes:
    """A fresh, unguessable object id: 128 bits from the OS CSPRNG (as :mod:`secrets`)."""
    try:
        return _IDS.pop()  # atomic: threads never get the same id
    except IndexError:
        block = os.urandom(16 * _ID_BLOCK)
        ids = [block[i:i + 16] for i in range(0, len(block), 16)]
        oid = ids.pop()
        _IDS.extend(ids)
        return oid


if hasattr(os, "register_at_fork"):
    # A forked child must not hand out the ids its parent (or a sibling) will use.
    os.register_at_fork(after_in_child=_IDS.clear)


def raise_error(reply: ErrorReply, worker: str) -> None:
    """Raise the veil exception that an :class:`ErrorReply` describes."""
    cls = getattr(_errors, reply.kind, None)
    message = reply.reason(worker) if reply.op else f"{reply.message} (worker {worker})"
    if isinstance(cls, type) and issubclass(cls, _errors.VeilError) and cls is not RemoteError:
        raise cls(message)
    raise RemoteError(message, op=reply.op, worker=worker)


class Worker(ABC):
    """A handle on a worker: a place where data lives and torch calls run.

    Args:
        name: the worker's name.
        client_name: the name this handle uses as requester, which a worker checks against
            the ``allowed`` list of private data.
    """

    #: Deletes of garbage-collected pointers are sent once this many are queued. Remote
    #: transports batch them; in-process workers free at once (old autograd graphs kept
    #: alive cost more than the messages).
    gc_batch: int = GC_BATCH
    #: After a backward, predict which leaves got a ``.grad`` (from the pointers' lineage)
    #: instead of asking: worth it where a round trip is expensive (network transports).
    _predict_grads: bool = False

    def __init__(self, name: str, *, client_name: str = "me") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a worker needs a non-empty str name, got {name!r}")
        self.name = name
        self.client_name = client_name
        self._gc: list[bytes] = []
        self._grad_clears: list[Any] = []
        self._leaves = LeafTable()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # ------------------------------------------------------------------ transport

    @property
    @abstractmethod
    def address(self) -> str:
        """Where other workers can reach this one (used by worker-to-worker moves)."""

    @abstractmethod
    def _submit(self, msg: Any) -> None:
        """Send a message that has no reply (it may be buffered until the next request)."""

    @abstractmethod
    def _send_request(self, msg: Any) -> Reply | ErrorReply:
        """Send a message and return its reply, after everything submitted before it."""

    def _command(self, msg: Any) -> None:
        """Submit a pipelined message after anything deferred (pointer code uses this)."""
        if self._grad_clears:
            self._flush_grad_clears()
        self._submit(msg)

    def _run(self, op: str, args: Any, kwargs: dict[str, Any], result_ids: Any) -> None:
        """Submit the command ``op`` (a transport may override this to skip the message)."""
        self._command(ExecuteCommand(op, args, kwargs, result_ids, torch.is_grad_enabled()))

    def _move_object(self, oid: bytes, destination: Worker, new_id: bytes) -> None:
        """Submit the move of object ``oid`` to ``destination`` (stored there as ``new_id``);
        a transport may override this to skip the message."""
        self._command(MoveObject(oid, destination.address, new_id))

    def _inplace_here(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Run the in-place command ``op`` on pointers and scalars at once, if this transport
        can without a message (in-process workers); False: send it as a command."""
        return False

    def _push(self) -> None:  # noqa: B027 (optional hook)
        """Start sending what is buffered without waiting (a hint; transports may ignore it)."""

    def _grad_flags(self, ids: tuple[bytes, ...]) -> list[bool]:
        """Which of ``ids`` have a ``.grad`` on the worker (a query; flushes the pipeline)."""
        return self._request(Query("grads", ids))

    def _refresh_grads(self) -> None:
        """Set ``_has_grad`` of each live leaf pointer from the worker (one round trip)."""
        leaves = self._leaves.items()
        flags = self._grad_flags(tuple(oid for oid, _ in leaves))
        for (_, p), flag in zip(leaves, flags):
            p._has_grad = bool(flag)

    def _defer_grad_clear(self, ref: Any) -> None:
        """Queue ``.grad = None`` for a tensor; sent as one command before the next message."""
        self._grad_clears.append(ref)

    def _flush_grad_clears(self) -> None:
        refs, self._grad_clears = tuple(self._grad_clears), []
        self._submit(ExecuteCommand("veil.clear_grads", (refs,), {}, None))

    def _request(self, msg: Any) -> Any:
        """Send ``msg``, wait for its reply and return its value, raising reported errors."""
        if self._grad_clears:
            self._flush_grad_clears()
        self._flush_gc()
        reply = self._send_request(msg)
        if type(reply) is ErrorReply:
            raise_error(reply, self.name)
        if type(reply) is not Reply:
            raise WorkerUnavailable(f"worker {self.name} answered with a {type(reply).__name__}")
        return reply.value

    def close(self) -> None:  # noqa: B027 (optional hook, nothing to release by default)
        """Release this handle's resources (nothing to do for in-process workers)."""

    # ------------------------------------------------------------------ garbage collection

    def _collect(self, oid: bytes) -> None:
        """Queue a remote delete (called from pointer finalizers; never sends by itself)."""
        self._gc.append(oid)

    def _flush_gc(self) -> None:
        if self._gc:
            # Swap first: a finalizer running meanwhile (any thread) appends to the list we
            # now hold or to the new one, never to nowhere.
            pending, self._gc = self._gc, []
            self._submit(DeleteObjects(tuple(pending)))

    def _maybe_flush_gc(self) -> None:
        if len(self._gc) >= self.gc_batch:
            self._flush_gc()

    # ------------------------------------------------------------------ public API

    def flush(self) -> None:
        """Wait until every pipelined command has run; raise the first one's error, if any."""
        self._request(Query("flush"))

    def object_count(self) -> int:
        """How many objects the worker holds (all clients' and its own)."""
        self._flush_gc()
        return int(self._request(Query("count")))

    def send(self, obj: Any) -> Any:
        """Send a tensor or a module to this worker; same as ``obj.send(worker)``."""
        from veil.pointers import send

        return send(obj, self)

    def host(self, tensor: torch.Tensor, *, tags: tuple[str, ...] | list[str] = (),
             description: str = "", private: bool = False,
             allowed: tuple[str, ...] | list[str] = ()) -> PointerTensor:
        """Register ``tensor`` as this worker's own data; return a pointer to it.

        ``private=True`` lets requesters compute on it but only those named in ``allowed``
        take it (or anything computed from it) home. Hosted data stays when clients go away.
        """
        from veil.pointers import PointerTensor

        _check_tensor(tensor)
        tags = _check_tags(tags, "tags")
        allowed = _check_tags(allowed, "allowed")
        oid = new_id()
        if self._grad_clears:
            self._flush_grad_clears()
        self._host(oid, tensor, tags, description, private, allowed)
        return PointerTensor._from_remote(self, oid, tensor.shape, tensor.dtype,
                                          tensor.requires_grad, owns=False)

    def _host(self, oid: bytes, tensor: torch.Tensor, tags: tuple[str, ...], description: str,
              private: bool, allowed: tuple[str, ...]) -> None:
        self._submit(StoreObject(oid, tensor, tags, description, private, allowed,
                                 (self.name,)))

    def search(self, *tags: str) -> list[PointerTensor]:
        """Pointers to the objects whose tags include all of ``tags``."""
        from veil.pointers import PointerTensor

        tags = _check_tags(tags, "tags")
        found = self._request(SearchObjects(tags))
        out = []
        for oid, shape, dtype, requires_grad, obj_tags, description in found:
            p = PointerTensor._from_remote(self, oid, torch.Size(shape), dtype, requires_grad,
                                           owns=False)
            p.tags = tuple(obj_tags)
            p.description = description
            out.append(p)
        return out


def _check_tensor(tensor: Any) -> None:
    if type(tensor) is not torch.Tensor:
        raise TypeError(f"expected a plain torch.Tensor, got {type(tensor).__name__}")


def _check_tags(tags: Any, what: str) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise TypeError(f"{what} must be a sequence of strings, not one string")
    tags = tuple(tags)
    if not all(isinstance(t, str) for t in tags):
        raise TypeError(f"{what} must all be strings, got {tags!r}")
    return tags
