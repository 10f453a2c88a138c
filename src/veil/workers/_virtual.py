"""VirtualWorker: a worker in this process, for experiments and tests."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from veil._errors import WorkerUnavailable
from veil.serde import GradRef, decode, encode
from veil.workers._allowlist import OPS
from veil.workers._base import Worker
from veil.workers._messages import ErrorReply, ExecuteCommand, Reply, moving_here
from veil.workers._node import Session, WorkerNode

_REGISTRY: weakref.WeakValueDictionary[str, VirtualWorker] = weakref.WeakValueDictionary()
_COUNTER = itertools.count()


def _deliver(address: str, msg: Any, sender: str) -> None:
    target = _REGISTRY.get(address)
    if target is None:
        raise WorkerUnavailable(f"no virtual worker at {address}")
    if target.serialize:
        msg = decode(encode(msg))
    reply = target.node.handle(msg, target._peer_session(sender))
    if type(reply) is ErrorReply:
        raise WorkerUnavailable(f"{address} refused the object: {reply.message}")


_SCALARS = frozenset({int, float, bool, str, type(None)})
_POINTER: list[type] = []


def _pointer_type() -> type:
    """``PointerTensor`` (imported on first use: veil.pointers imports this package)."""
    if not _POINTER:
        from veil.pointers import PointerTensor

        _POINTER.append(PointerTensor)
    return _POINTER[0]


class VirtualWorker(Worker):
    """A worker living in this process: same messages and rules as a network worker.

    Args:
        name: the worker's name.
        serialize: push every message and reply through the wire format, as a network worker
            would (slower; checks that everything the program sends can travel).
        client_name: the requester name this handle presents to the worker.
    """

    gc_batch = 1

    def __init__(self, name: str, *, serialize: bool = False, client_name: str = "me") -> None:
        super().__init__(name, client_name=client_name)
        self.serialize = serialize
        self._address = f"virtual://{name}#{next(_COUNTER)}"
        self.node = WorkerNode(name, send_to_peer=self._send_to_peer)
        self._session = Session(client_name)
        self._peers: dict[str, Session] = {}
        self.messages = 0  # messages handled for this handle, for benchmarks
        _REGISTRY[self._address] = self

    @property
    def address(self) -> str:
        return self._address

    def _send_to_peer(self, address: str, msg: Any) -> None:
        self.messages += 1
        _deliver(address, msg, self.name)

    def _peer_session(self, sender: str) -> Session:
        session = self._peers.get(sender)
        if session is None:
            session = self._peers[sender] = Session(sender)
        return session

    def _submit(self, msg: Any) -> None:
        self.messages += 1
        if self.serialize:
            self.node.handle(decode(encode(msg)), self._session)
        elif type(msg) is ExecuteCommand:
            self.node.execute(msg.op, msg.args, msg.kwargs, msg.result_ids, self._session)
        else:
            self.node.handle(msg, self._session)
        self._maybe_flush_gc()

    def _flush_gc(self) -> None:
        if self.serialize or not self._gc:
            super()._flush_gc()
            return
        # In process: the deletes run now, without building a message (same rules).
        pending, self._gc = self._gc, []
        if self._grad_clears:
            self._flush_grad_clears()
        self.messages += 1
        if self._session.error is None:
            self.node.delete_ids(pending, self._session)

    def _move_object(self, oid: bytes, destination: Worker, new_id: bytes) -> None:
        if self._session.error is not None and isinstance(destination, VirtualWorker):
            # Skipped here (a pending error); as a network destination hears through
            # MoveFailed, this one's client learns why the object did not come.
            destination._move_failed(new_id, self.name, self._session.error)
        # The SMPC protocols move shares and masks between parties dozens of times a step.
        # In process, a public tensor that is not hosted data goes straight from this store
        # into the destination's, as the MoveObject and the peer's StoreObject would put it;
        # anything else (private or hosted data, serialization, a pending error, an id in
        # use, a missing object) takes the message path, which has the rules and the errors.
        if self.serialize or type(self) is not VirtualWorker \
                or type(destination) is not VirtualWorker or destination.serialize \
                or self._grad_clears:
            super()._move_object(oid, destination, new_id)
            return
        node = self.node
        store = node.store
        session = self._session
        peer = destination._peers.get(self.name)
        obj = store.objects.get(oid)
        if session.error is not None or peer is None or peer.error is not None \
                or not isinstance(obj, torch.Tensor) or (store.perms and oid in store.perms) \
                or (store.infos and oid in store.infos) or peer.track \
                or peer.max_objects is not None or new_id in destination.node.store.objects:
            super()._move_object(oid, destination, new_id)
            return
        self.messages += 2  # the move, and the store it sends to the peer
        destination.node.store.put(new_id, obj.detach().requires_grad_(obj.requires_grad))
        node.delete_ids((oid,), session)
        self._maybe_flush_gc()

    def _move_failed(self, new_id: bytes, source: str, error: ErrorReply) -> None:
        """A move into this worker was not carried out by ``source`` because of ``error``:
        this client's session fails with the reason (the first failure is kept), so the
        next request here names the cause instead of a missing object."""
        session = self._session
        if session.error is None:
            what = moving_here(new_id, source)
            reason = error.reason(source)
            session.error = ErrorReply(error.kind, f"{what} did not come: {reason}", "move")

    def _inplace_here(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        # The optimizer's hot path (param.add_(grad, alpha=-lr)): the objects are looked up
        # and the op runs, with no message and no node frame. Only in the plain case: when the
        # store holds private objects (whose restriction in-place writes carry), something is
        # pending, or an argument is not a pointer here or a scalar, the command path runs.
        if self.serialize or self._grad_clears or self._gc:
            return False
        node = self.node
        store = node.store
        session = self._session
        if store.perms or session.error is not None:
            return False
        fn = OPS.get(op)
        if fn is None:
            return False
        objects = store.objects
        values = []
        pointer_type = _pointer_type()
        for a in args:
            t = type(a)
            if t is pointer_type:
                if a.location is not self or a._moved_to is not None:
                    return False
                ref = a._ref
                obj = objects.get(ref.id)
                if obj is None:
                    return False
                if type(ref) is GradRef:
                    if not isinstance(obj, torch.Tensor):
                        return False
                    obj = obj.grad
                values.append(obj)
            elif t in _SCALARS:
                values.append(a)
            else:
                return False
        for v in kwargs.values():
            if type(v) not in _SCALARS:
                return False
        self.messages += 1
        try:
            fn(*values, **kwargs)
        except Exception as exc:
            session.fail(exc, op)
        return True

    def _run(self, op: str, args: Any, kwargs: dict[str, Any], result_ids: Any) -> None:
        if self.serialize:
            super()._run(op, args, kwargs, result_ids)
            return
        if self._grad_clears:
            self._flush_grad_clears()
        self.messages += 1
        # WorkerNode.execute, inline: every command of a training step comes through here.
        session = self._session
        if session.error is None:
            try:
                self.node._run(op, args, kwargs, result_ids, session)
            except Exception as exc:
                session.fail(exc, op)
        if self._gc and len(self._gc) >= self.gc_batch:
            self._flush_gc()

    def _flush_grad_clears(self) -> None:
        if self.serialize:
            super()._flush_grad_clears()
            return
        refs, self._grad_clears = tuple(self._grad_clears), []
        self.messages += 1
        self.node.execute("veil.clear_grads", (refs,), {}, None, self._session)

    def _refresh_grads(self) -> None:
        if self._grad_clears:
            self._flush_grad_clears()
        if self.serialize or self._session.error is not None or self._gc:
            super()._refresh_grads()  # the message path reports pending errors
            return
        # In process: read the flags straight from the store, in one pass over the leaves.
        self.messages += 1
        objects = self.node.store.objects
        for oid, p in self._leaves.items():
            p._has_grad = getattr(objects.get(oid), "grad", None) is not None

    def _grad_flags(self, ids: tuple[bytes, ...]) -> list[bool]:
        if self.serialize or self._session.error is not None or self._gc:
            return super()._grad_flags(ids)  # the message path reports pending errors
        if self._grad_clears:
            self._flush_grad_clears()
        self.messages += 1
        objects = self.node.store.objects
        return [getattr(objects.get(i), "grad", None) is not None for i in ids]

    def _send_request(self, msg: Any) -> Reply | ErrorReply:
        self.messages += 1
        if self.serialize:
            msg = decode(encode(msg))
            reply = self.node.handle(msg, self._session)
            return decode(encode(reply))
        return self.node.handle(msg, self._session)  # type: ignore[return-value]
