"""The worker's side of the protocol: an object store and the handling of messages.

A :class:`WorkerNode` is what a worker *is*: the data it holds and the rules it keeps. It is
driven by messages, in-process (:class:`~veil.VirtualWorker`) or from a network connection,
each on behalf of a :class:`Session` that names the requester and collects the error of a
pipelined command until the next message that has a reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from veil._errors import (
    CommandNotAllowed,
    LimitExceeded,
    ObjectNotFound,
    PermissionDenied,
    ProtocolError,
    SerializationError,
    VeilError,
)
from veil.serde import GradRef, Ref
from veil.workers import _modules
from veil.workers._allowlist import OPS, TRAINING_DATA, lookup, register_function
from veil.workers._messages import (
    Batch,
    DeleteObjects,
    ErrorReply,
    ExecuteCommand,
    FetchObject,
    MoveObject,
    Query,
    Reply,
    SearchObjects,
    StoreModule,
    StoreObject,
)
from veil.workers._store import Info, ObjectStore, Permission, merge

register_function("veil.module_call", _modules.module_call)

#: A function that delivers a message to another worker, by its address.
PeerSender = Callable[[str, Any], None]


class Session:
    """One requester's conversation with a node.

    ``requester`` is the name checked against permissions. ``created`` tracks the ids this
    session stored, so that a network server can release them when the client goes away.
    """

    __slots__ = ("created", "error", "max_objects", "requester", "track")

    def __init__(self, requester: str, *, track: bool = False, max_objects: int | None = None):
        self.requester = requester
        self.error: ErrorReply | None = None
        self.track = track
        self.created: set[bytes] = set()
        self.max_objects = max_objects

    def fail(self, exc: BaseException, op: str | None) -> None:
        """Remember the first failure of a pipelined message."""
        if self.error is None:
            self.error = error_reply(exc, op)


def error_reply(exc: BaseException, op: str | None = None) -> ErrorReply:
    """An :class:`ErrorReply` describing ``exc``."""
    kind = type(exc).__name__ if isinstance(exc, VeilError) else "RemoteError"
    text = str(exc) if isinstance(exc, VeilError) else f"{type(exc).__name__}: {exc}"
    return ErrorReply(kind, text, op)


class WorkerNode:
    """The store and message handling of one worker.

    Args:
        name: the worker's name; it owns the data it hosts under this name.
        send_to_peer: delivers a :class:`StoreObject` to another worker by address (used by
            moves, which go worker to worker without passing through the requester).
    """

    def __init__(self, name: str, send_to_peer: PeerSender | None = None):
        self.name = name
        self.store = ObjectStore()
        self._send_to_peer = send_to_peer
        self._handlers: dict[type, Callable[[Any, Session], Any]] = {
            ExecuteCommand: self._execute,
            StoreObject: self._store_object,
            FetchObject: self._fetch,
            DeleteObjects: self._delete,
            SearchObjects: self._search,
            MoveObject: self._move,
            Query: self._query,
            StoreModule: self._store_module,
        }

    # ------------------------------------------------------------------ entry points

    def handle(self, msg: Any, session: Session) -> Reply | ErrorReply | None:
        """Handle one message; return its reply, or None for a pipelined message.

        A message that has a reply first reports the error of any earlier pipelined message
        of this session (and then the message itself is not run).
        """
        if type(msg) is Batch:
            return Reply([self.handle(m, session) for m in msg.messages])
        handler = self._handlers.get(type(msg))
        pipelined = type(msg) in _PIPELINED
        if handler is None:
            exc = SerializationError(f"a worker cannot handle a {type(msg).__name__}")
            if pipelined:
                session.fail(exc, None)
                return None
            return error_reply(exc)
        if pipelined:
            if session.error is not None:
                return None  # after a failure, later pipelined work is skipped
            try:
                handler(msg, session)
            except Exception as exc:
                session.fail(exc, getattr(msg, "op", type(msg).__name__))
            return None
        if session.error is not None:
            err, session.error = session.error, None
            return err
        try:
            return Reply(handler(msg, session))
        except Exception as exc:
            return error_reply(exc, getattr(msg, "op", None))

    def release(self, session: Session) -> None:
        """Forget every object ``session`` created (its client went away)."""
        for oid in session.created:
            self.store.delete(oid)
        session.created.clear()

    # ------------------------------------------------------------------ storing

    def _put(self, oid: bytes, obj: Any, perm: Permission | None, session: Session,
             info: Info | None = None) -> None:
        store = self.store
        if oid in store.objects:
            raise ProtocolError(f"object id {oid.hex()[:12]}… is already in use")
        if session.max_objects is not None and len(session.created) >= session.max_objects:
            raise LimitExceeded(
                f"client holds {len(session.created)} objects, the limit is {session.max_objects}"
            )
        store.put(oid, obj, perm, info)
        if session.track:
            session.created.add(oid)

    def _store_object(self, msg: StoreObject, session: Session) -> None:
        perm = None
        if msg.private:
            owners = frozenset(msg.owners) or frozenset((session.requester,))
            perm = Permission(owners, frozenset(msg.allowed))
        info = Info(tuple(msg.tags), msg.description) if (msg.tags or msg.description) else None
        self._put(msg.id, msg.value, perm, session, info)

    def host(self, oid: bytes, obj: Any, *, tags: tuple[str, ...] = (), description: str = "",
             private: bool = False, allowed: tuple[str, ...] = ()) -> None:
        """Register the worker's own data (not released when any client goes away)."""
        perm = Permission(frozenset((self.name,)), frozenset(allowed)) if private else None
        self.store.put(oid, obj, perm, Info(tuple(tags), description))

    def _store_module(self, msg: StoreModule, session: Session) -> None:
        module = _modules.build(msg.spec)
        tensors = dict(module.named_parameters())
        tensors.update(module.named_buffers())
        if set(msg.state) != set(tensors) or set(msg.ids) != set(tensors):
            raise SerializationError(
                f"module state names {sorted(msg.state)} do not match its tensors "
                f"{sorted(tensors)}"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                value = msg.state[name]
                if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
                    raise SerializationError(f"module state {name!r} has the wrong shape")
                tensor.copy_(value)
        self._put(msg.id, module, None, session)
        for name, tensor in tensors.items():
            self._put(msg.ids[name], tensor, None, session)

    # ------------------------------------------------------------------ taking

    def _fetch(self, msg: FetchObject, session: Session) -> Any:
        obj = self.store.get(msg.id)
        perm = self.store.perms.get(msg.id)
        if perm is not None:
            perm.check(session.requester, f"object {msg.id.hex()[:12]}…")
        if msg.grad:
            if not isinstance(obj, torch.Tensor):
                raise TypeError("only tensors have a .grad")
            obj = obj.grad
        if isinstance(obj, nn.Module):
            raise TypeError("a module is fetched through its parameters, not whole")
        if isinstance(obj, torch.Tensor):
            obj = obj.detach()
        return obj

    def _delete(self, msg: DeleteObjects, session: Session) -> None:
        self.delete_ids(msg.ids, session)

    def delete_ids(self, ids: Any, session: Session) -> None:
        """Delete objects for ``session`` (the in-process fast path of a DeleteObjects)."""
        store = self.store
        objects = store.objects
        perms = store.perms
        infos = store.infos
        created = session.created
        for oid in ids:
            if infos and infos.get(oid) is not None and oid not in created:
                continue  # hosted data is the worker's own; clients cannot delete it
            # ObjectStore.delete, inline (a training step frees hundreds of results)
            if objects.pop(oid, None) is not None:
                if perms:
                    perms.pop(oid, None)
                if infos:
                    infos.pop(oid, None)
            if created:
                created.discard(oid)

    def _search(self, msg: SearchObjects, session: Session) -> list[list[Any]]:
        out = []
        for oid in self.store.search(tuple(msg.tags)):
            obj = self.store.objects[oid]
            info = self.store.infos[oid]
            if isinstance(obj, torch.Tensor):
                out.append([oid, tuple(obj.shape), obj.dtype, obj.requires_grad,
                            tuple(info.tags), info.description])
        return out

    def _move(self, msg: MoveObject, session: Session) -> None:
        if self._send_to_peer is None:
            raise ProtocolError(f"worker {self.name!r} cannot reach other workers")
        obj = self.store.get(msg.id)
        if not isinstance(obj, torch.Tensor):
            raise TypeError("only tensors can be moved between workers")
        perm = self.store.perms.get(msg.id)
        hosted = msg.id in self.store.infos
        # The permission travels with the value: the receiving worker keeps the restriction.
        store = StoreObject(msg.new_id, obj.detach().requires_grad_(obj.requires_grad),
                            private=perm is not None,
                            allowed=tuple(sorted(perm.allowed)) if perm else (),
                            owners=tuple(sorted(perm.owners)) if perm else ())
        self._send_to_peer(msg.destination, store)
        if not hosted:
            self.store.delete(msg.id)
            session.created.discard(msg.id)

    def _query(self, msg: Query, session: Session) -> Any:
        if msg.what == "flush":
            return None
        if msg.what == "count":
            return len(self.store)
        objects = self.store.objects
        if msg.what == "grads":
            return [isinstance(o := objects.get(i), torch.Tensor) and o.grad is not None
                    for i in msg.ids]
        # "meta"
        return [_describe(self.store.get(oid)) for oid in msg.ids]

    # ------------------------------------------------------------------ running commands

    def execute(self, op: str, args: Any, kwargs: dict[str, Any], result_ids: Any,
                session: Session) -> None:
        """Run a pipelined command now: the in-process fast path of :meth:`handle`.

        Takes the fields of an :class:`ExecuteCommand` without building one.
        """
        if session.error is not None:
            return
        try:
            self._run(op, args, kwargs, result_ids, session)
        except Exception as exc:
            session.fail(exc, op)

    def _execute(self, msg: ExecuteCommand, session: Session) -> None:
        if msg.grad:
            self._run(msg.op, msg.args, msg.kwargs, msg.result_ids, session)
        else:
            with torch.no_grad():
                self._run(msg.op, msg.args, msg.kwargs, msg.result_ids, session)

    def _run(self, op: str, wargs: Any, wkwargs: dict[str, Any], result_ids: Any,
             session: Session) -> None:
        fn = OPS.get(op)
        if fn is None:
            fn = lookup(op)  # raises CommandNotAllowed naming it
        perms: list[Permission | None] = [None]
        objects = self.store.objects
        private = self.store.perms
        untracked = TRAINING_DATA.get(op)
        if untracked is not None:
            args = [self._resolve_one(a, [None] if i in untracked else perms)
                    for i, a in enumerate(wargs)]
        else:
            args = []
            for a in wargs:
                t = type(a)
                if t is Ref or t is GradRef:
                    obj = objects.get(a.id)
                    if obj is None or (private and a.id in private):
                        obj = self._resolve_one(a, perms)
                    elif t is GradRef:
                        if not isinstance(obj, torch.Tensor):
                            raise TypeError("only tensors have a .grad")
                        obj = obj.grad
                    args.append(obj)
                elif t in _PLAIN:
                    args.append(a)
                else:
                    args.append(self._resolve_one(a, perms))
        if wkwargs:
            kwargs = {}
            for k, v in wkwargs.items():
                kwargs[k] = v if type(v) in _PLAIN else self._resolve_one(v, perms)
        else:
            kwargs = wkwargs
        result = fn(*args, **kwargs)
        ids_type = type(result_ids)
        if ids_type is bytes and not session.track and session.max_objects is None:
            # The common case: one tensor, an untracked session.
            _put_untracked(objects, private, result_ids, result, perms[0])
        elif ids_type is tuple and not session.track and session.max_objects is None \
                and (type(result) is tuple or type(result) is list) \
                and len(result) == len(result_ids):
            # Several results (the SMPC steps); a nested id takes the general path for its part.
            perm = perms[0]
            for rid, r in zip(result_ids, result):
                if type(rid) is bytes:
                    _put_untracked(objects, private, rid, r, perm)
                else:
                    self._store_results(rid, r, perm, session)
        elif result_ids is not None:
            self._store_results(result_ids, result, perms[0], session)
        elif perms[0] is not None and wargs and type(wargs[0]) is Ref:
            # An in-place op or setter wrote private values into its first argument: the
            # target now carries their restriction too.
            target = wargs[0].id
            if target in objects:
                private[target] = perms[0].merge(private.get(target))

    def _resolve_one(self, a: Any, perms: list[Permission | None]) -> Any:
        t = type(a)
        if t is Ref:
            store = self.store
            try:
                obj = store.objects[a.id]
            except KeyError:
                raise ObjectNotFound(
                    f"no object with id {a.id.hex()[:12]}… on this worker"
                ) from None
            perm = store.perms.get(a.id)
            if perm is not None:
                perms[0] = merge(perms[0], perm)
            return obj
        if t is GradRef:
            base = self._resolve_one(Ref(a.id), perms)
            if not isinstance(base, torch.Tensor):
                raise TypeError("only tensors have a .grad")
            return base.grad
        if t is tuple or t is list:
            # Public stored objects inline (e.g. veil.clear_grads' tuple of parameters).
            objects = self.store.objects
            private = self.store.perms
            out = []
            for x in a:
                if type(x) is Ref and not (private and x.id in private):
                    obj = objects.get(x.id)
                    if obj is not None:
                        out.append(obj)
                        continue
                out.append(self._resolve_one(x, perms))
            return t(out)
        if t is dict:
            return {k: self._resolve_one(v, perms) for k, v in a.items()}
        return a

    def _store_results(self, ids: Any, result: Any, perm: Permission | None,
                       session: Session) -> None:
        if ids is None:
            return
        if type(ids) is bytes:
            self._put(ids, result, perm, session)
            return
        if not isinstance(result, (tuple, list)) or len(result) != len(ids):
            raise ProtocolError("the command's result does not match its result ids")
        for i, r in zip(ids, result):
            self._store_results(i, r, perm, session)


_PLAIN = frozenset({int, float, bool, str, type(None)})


def _put_untracked(objects: dict[bytes, Any], private: dict[bytes, Any], oid: bytes, obj: Any,
                   perm: Permission | None) -> None:
    """:meth:`WorkerNode._put` of a command's result for a session that neither tracks nor
    limits its objects, without the method's checks that cannot apply (every command)."""
    if oid in objects:
        raise ProtocolError(f"object id {oid.hex()[:12]}… is already in use")
    objects[oid] = obj
    if perm is not None:
        private[oid] = perm
    elif private:
        private.pop(oid, None)


def _describe(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return [tuple(obj.shape), obj.dtype, obj.requires_grad, obj.is_leaf]
    if isinstance(obj, (tuple, list)) and obj and any(isinstance(o, torch.Tensor) for o in obj):
        return ["seq", [_describe(o) if isinstance(o, torch.Tensor) else None for o in obj]]
    return None


_PIPELINED = frozenset({ExecuteCommand, StoreObject, DeleteObjects, MoveObject, StoreModule})

__all__ = ["CommandNotAllowed", "PermissionDenied", "Session", "WorkerNode", "error_reply"]
