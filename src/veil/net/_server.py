"""The network worker: one :class:`~veil.workers.WorkerNode` served over WebSockets.

One asyncio event loop runs every connection, and the node's messages are handled on it one
frame at a time, so the node needs no locks. Each connection is authenticated first
(:mod:`veil.net._auth`); nothing it sends before that is read as a message. Then each binary
frame (a message or a ``Batch``) gets exactly one reply frame (see :mod:`veil.net._frames`).

Every client has a :class:`~veil.workers.Session` that tracks the objects it created and their
bytes; going over a limit fails that client's message with :class:`veil.LimitExceeded` and
rolls back what the message created. When the connection ends, for whatever reason, the
session's objects are released; data the worker hosts stays.

Moves go worker to worker: the node hands the object to :meth:`_queue_move`, and the server
delivers it (:class:`~veil.net._peers.PeerLinks`) before handling the client's next message.
A move's destination address names the receiving client's session, so the moved object
counts against, and is released with, that client's session there. A move the node refuses
(a missing object, an earlier error of the session...) is reported to the destination with a
``MoveFailed`` over the same link.

The client orders a move against what it sends the destination with an ``AwaitObject`` in the
destination's stream: the destination's frame waits there (awaiting, so the loop goes on
serving other connections, among them the peer links that deliver objects) until the object
is stored in that client's session, or its delivery or the move failed (the session then
fails with that error), or the source worker's link into that session is lost, or the peer
timeout passes. A link is lost when it ends without a closing handshake from either side
(close code 1006: the source's process died, or the network broke): every move the session
is waiting for from that worker then fails at once with :class:`veil.WorkerUnavailable`,
naming the object and the worker. A link closed normally (the source evicting an idle
link, this worker's idle timeout) fails nothing: the source opens a new one for its next
delivery. The peer timeout remains the fallback, e.g. for a source that dies before it ever
opened a link into the session, or one that hangs with its link open; the session then
fails naming the object and the source worker. Each worker handles a client's messages in
order and its peers' deliveries concurrently, and a client only waits for moves it
submitted before the wait, so crossing moves cannot wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from veil._errors import (
    AuthenticationError,
    LimitExceeded,
    ProtocolError,
    SerializationError,
    VeilError,
    WorkerUnavailable,
)
from veil.net._auth import (
    SESSION_ENDED,
    SESSION_KEY_BYTES,
    TokenBook,
    check_auth,
    make_challenge,
    make_welcome,
)
from veil.net._limits import HeldObjects, Limits
from veil.net._peers import PeerLinks
from veil.serde import decode, encode
from veil.workers import (
    Batch,
    ErrorReply,
    MoveObject,
    Reply,
    Session,
    StoreObject,
    WorkerNode,
    new_id,
)
from veil.workers._messages import AwaitObject, MoveFailed, moving_here
from veil.workers._node import error_reply

log = logging.getLogger("veil.worker")

#: Errors logged per connection; later ones are counted and summed up when it closes.
LOGGED_ERRORS = 20
#: Failed moves into a session remembered until an ``AwaitObject`` asks (the oldest go first).
MAX_FAILED_MOVES = 4096
#: Longest error message a ``MoveFailed`` carries.
MAX_REASON = 2000
#: A wait for a moved object that lasts longer than this (seconds) is logged.
SLOW_MOVE = 1.0


class _Client:
    """The state of one authenticated connection."""

    __slots__ = (
        "errors",
        "failed",
        "frames",
        "key",
        "links",
        "name",
        "session",
        "target",
        "waiting",
        "where",
        "ws",
    )

    def __init__(
        self,
        ws: ServerConnection,
        where: str,
        name: str,
        session: Session,
        key: bytes | None,
        target: _Client | None,
    ) -> None:
        self.ws = ws
        self.where = where
        self.name = name
        self.session = session
        self.key = key  # None for a worker delivering moved objects into ``target``
        self.target = target
        self.links: set[ServerConnection] = set()
        self.frames = 0
        self.errors = 0
        # Moves into this client's session: the one its frame waits for (with the name of
        # the worker it comes from), and failures that arrived before their AwaitObject.
        self.waiting: dict[bytes, tuple[str, asyncio.Future[ErrorReply | None]]] = {}
        self.failed: dict[bytes, ErrorReply] = {}

    def describe(self) -> str:
        if self.target is not None:
            return f"worker {self.name!r} ({self.where}) delivering to {self.target.describe()}"
        return f"client {self.name!r} ({self.where})"


class WorkerServer:
    """A worker served over WebSockets.

    Args:
        name: the worker's name.
        host: the interface to bind (loopback unless told otherwise).
        port: the TCP port; 0 picks a free one (see :attr:`port` once started).
        tokens: the tokens clients must prove; None accepts any client (loopback only).
        peer_token: the token this worker proves to other workers when it moves objects to
            them; default: its own shared token.
        tls: a TLS server context (``wss://``), or None.
        peer_ca_file: PEM certificates to trust for ``wss://`` peers.
        limits: what one client may cost.
    """

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 8777,
        tokens: TokenBook | None = None,
        peer_token: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        peer_ca_file: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a worker needs a non-empty name")
        if tokens is None and not _is_loopback(host):
            raise ValueError(
                f"refusing to serve on {host} without a token: anyone who can reach it could "
                "use the worker (give a token file, or bind 127.0.0.1)"
            )
        self.name = name
        self.host = host
        self.port = port
        self.tokens = tokens
        self.tls = tls
        self.limits = limits or Limits()
        self.node = WorkerNode(name, send_to_peer=self._queue_move)
        if peer_token is None and tokens is not None:
            peer_token = tokens.shared
        self._peers = PeerLinks(
            name, peer_token, ca_file=peer_ca_file, timeout=self.limits.peer_timeout
        )
        self._outbox: list[tuple[str, Any]] = []
        self._clients: dict[bytes, _Client] = {}
        self._connections: set[ServerConnection] = set()
        self._server: Server | None = None

    @property
    def url(self) -> str:
        """Where clients connect (after :meth:`start`)."""
        scheme = "wss" if self.tls is not None else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def host_tensor(
        self,
        tensor: torch.Tensor,
        *,
        tags: tuple[str, ...] = (),
        description: str = "",
        private: bool = True,
        allowed: tuple[str, ...] = (),
    ) -> bytes:
        """Host ``tensor`` as the worker's own data (it stays when clients leave); its id."""
        if type(tensor) is not torch.Tensor:
            raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        oid = new_id()
        self.node.host(
            oid,
            tensor,
            tags=tuple(tags),
            description=description,
            private=private,
            allowed=tuple(allowed),
        )
        return oid

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and start serving."""
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            ssl=self.tls,
            compression=None,
            open_timeout=self.limits.handshake_timeout,
            ping_interval=None,
            close_timeout=5,
            max_size=self.limits.max_frame,
            max_queue=4,
            server_header=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close every connection (releasing clients' objects) and stop listening."""
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        await self._peers.close()

    async def run(
        self,
        *,
        port_file: str | Path | None = None,
        exit_with_parent: bool = False,
        ready: Callable[[WorkerServer], None] | None = None,
    ) -> None:
        """Serve until SIGINT or SIGTERM (or the parent process exits, if asked)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        log.info(
            "worker %r listening on %s%s",
            self.name,
            self.url,
            "" if self.tokens else " (no token: any local client may connect)",
        )
        if port_file is not None:
            tmp = Path(f"{port_file}.tmp")
            tmp.write_text(f"{self.port}\n")
            tmp.replace(port_file)
        if ready is not None:
            ready(self)
        watcher = asyncio.ensure_future(_watch_parent(stop)) if exit_with_parent else None
        try:
            await stop.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            log.info("worker %r stopping", self.name)
            await self.stop()
            log.info("worker %r stopped", self.name)

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        where = _where(ws)
        if len(self._connections) >= self.limits.max_clients:
            log.warning("refused %s: already serving %d connections", where, len(self._connections))
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many clients")
            return
        _keepalive(ws)
        self._connections.add(ws)
        client: _Client | None = None
        try:
            client = await self._authenticate(ws, where)
            if client is not None:
                log.info("%s connected", client.describe())
                await self._serve(client)
        finally:
            self._connections.discard(ws)
            if client is not None:
                self._depart(client)

    async def _authenticate(self, ws: ServerConnection, where: str) -> _Client | None:
        nonce, challenge = make_challenge(self.name, self.tokens is not None)
        try:
            await ws.send(challenge)
            frame = await asyncio.wait_for(ws.recv(), self.limits.handshake_timeout)
            hello = check_auth(frame, self.tokens, self.name, nonce)
            target = None
            if hello.into:
                target = self._clients.get(hello.into)
                if target is None:
                    log.warning("refused %s: the session it delivers to has ended", where)
                    await ws.close(SESSION_ENDED, "the receiving session has ended")
                    return None
            session = Session(hello.name, track=True, max_objects=self.limits.max_objects)
            key = secrets.token_bytes(SESSION_KEY_BYTES)
            if target is None:
                session.created = HeldObjects(self.node.store.objects)
            else:
                session.created = target.session.created  # moved objects are the target's
            await ws.send(make_welcome(hello, self.name, nonce, key, self.limits.for_client()))
        except AuthenticationError as exc:
            log.warning("refused %s: %s", where, exc)
            await ws.close(CloseCode.POLICY_VIOLATION, "authentication failed")
            return None
        except TimeoutError:
            log.warning(
                "refused %s: no authentication within %g s", where, self.limits.handshake_timeout
            )
            await ws.close(CloseCode.POLICY_VIOLATION, "authentication timed out")
            return None
        except ConnectionClosed:
            log.info("%s left during the handshake", where)
            return None
        client = _Client(ws, where, hello.name, session, None if target else key, target)
        if target is None:
            self._clients[key] = client
        else:
            target.links.add(ws)
        return client

    async def _serve(self, client: _Client) -> None:
        ws = client.ws
        idle = self.limits.idle_timeout
        while True:
            try:
                if idle is None:
                    data = await ws.recv()
                else:
                    data = await asyncio.wait_for(ws.recv(), idle)
            except TimeoutError:
                log.info("%s idle for %g s: disconnecting", client.describe(), idle)
                await ws.close(CloseCode.NORMAL_CLOSURE, "idle")
                return
            except ConnectionClosed:
                return
            if isinstance(data, str):
                self._log_error(client, "sent a text frame: closing (binary frames only)")
                await ws.close(CloseCode.UNSUPPORTED_DATA, "binary frames only")
                return
            if client.target is not None and client.target.key not in self._clients:
                await ws.close(CloseCode.GOING_AWAY, "session ended")
                return
            reply = await self._frame(data, client)
            try:
                await ws.send(reply)
            except ConnectionClosed:
                return

    def _depart(self, client: _Client) -> None:
        target = client.target
        if target is not None:
            target.links.discard(client.ws)
            live = self._clients.get(target.key) is target  # type: ignore[arg-type]
            if live and _lost(client.ws):
                failed = self._source_lost(client, target)
                log.warning(
                    "lost the connection from %s%s",
                    client.describe(),
                    f"; failed {failed} waiting move(s) from it" if failed else "",
                )
            else:
                log.info("%s disconnected", client.describe())
            return
        self._clients.pop(client.key, None)  # type: ignore[arg-type]
        count = len(client.session.created)
        self.node.release(client.session)
        for link in list(client.links):
            link.transport.abort()  # a worker still delivering into the released session
        extra = client.errors - LOGGED_ERRORS
        log.info(
            "%s disconnected after %d frames; released %d objects%s",
            client.describe(),
            client.frames,
            count,
            f"; {extra} more errors not logged" if extra > 0 else "",
        )

    # ------------------------------------------------------------------ messages

    async def _frame(self, data: bytes, client: _Client) -> bytes:
        """Handle one frame; the bytes of its reply."""
        client.frames += 1
        try:
            reply = await self._messages(data, client)
        except Exception as exc:  # a bug in the worker must not end it, nor this client
            log.exception("internal error handling a frame from %s", client.describe())
            reply = ErrorReply("RemoteError", f"internal error on the worker: {exc!r}", None)
        if type(reply) is ErrorReply:
            self._log_error(
                client, f"{reply.kind}: {reply.message}" + (f" (op {reply.op})" if reply.op else "")
            )
        try:
            return encode(reply)
        except SerializationError as exc:
            self._log_error(client, f"reply cannot be encoded: {exc}")
            return encode(error_reply(exc))

    async def _messages(self, data: bytes, client: _Client) -> Reply | ErrorReply:
        try:
            msg = decode(data)
        except SerializationError as exc:
            return error_reply(exc)
        msgs = msg.messages if type(msg) is Batch else (msg,)
        session = client.session
        held: HeldObjects = session.created  # type: ignore[assignment]
        node = self.node
        reply: Reply | ErrorReply | None = None
        last = len(msgs) - 1
        for i, m in enumerate(msgs):
            t = type(m)
            if t is AwaitObject or t is MoveFailed:
                await self._move_signal(m, client)
                reply = None
                continue
            held.added.clear()
            queued = len(self._outbox)
            reply = node.handle(m, session)
            if held.nbytes > self.limits.max_bytes:
                self._roll_back(session, held, m)
            if t is StoreObject and client.target is not None:
                # A peer's delivery into its target's session (rolled back if over a limit).
                self._settle_move(client.target, m.id, session.error)
            elif t is MoveObject and len(self._outbox) == queued:
                self._queue_move_failure(m, session)
            if self._outbox:
                pending, self._outbox = self._outbox, []
                await self._deliver(pending, session)
            if i != last and reply is not None:
                # Requests belong at the end of a frame; one in the middle keeps its error
                # for the next request rather than losing it.
                if type(reply) is ErrorReply and session.error is None:
                    session.error = reply
                reply = None
        return reply if reply is not None else Reply(None)

    def _roll_back(self, session: Session, held: HeldObjects, msg: Any) -> None:
        over = held.nbytes
        for oid in list(held.added):
            self.node.store.delete(oid)
            held.discard(oid)
        session.fail(
            LimitExceeded(
                f"the client would hold {over} bytes on worker {self.name!r}; the limit is "
                f"{self.limits.max_bytes}"
            ),
            getattr(msg, "op", None) or type(msg).__name__,
        )

    # ------------------------------------------------------------------ moves

    async def _move_signal(self, msg: AwaitObject | MoveFailed, client: _Client) -> None:
        """Handle an ``AwaitObject`` from a client or a ``MoveFailed`` from a peer link."""
        session = client.session
        if type(msg) is MoveFailed:
            if client.target is None:
                session.fail(
                    ProtocolError("MoveFailed is sent by workers delivering moves, not clients"),
                    "MoveFailed",
                )
                return
            text = msg.message[:MAX_REASON]
            self._settle_move(client.target, msg.id, ErrorReply(msg.kind[:100], text, None))
            return
        if session.error is not None:
            return  # like any pipelined message after a failure: skipped
        if client.target is not None:
            session.fail(
                ProtocolError("AwaitObject is sent by clients, not by workers delivering moves"),
                "AwaitObject",
            )
            return
        oid = msg.id
        if oid in session.created:
            return  # already here
        what = moving_here(oid, msg.source[:100])
        error = client.failed.pop(oid, None)
        if error is None:
            if oid in client.waiting:  # cannot happen: a client's frames run one at a time
                session.fail(ProtocolError(f"already waiting for {what}"), "AwaitObject")
                return
            fut: asyncio.Future[ErrorReply | None] = asyncio.get_running_loop().create_future()
            client.waiting[oid] = (msg.source, fut)
            try:
                error = await self._wait_for_move(fut, client, what)
            except TimeoutError:
                session.fail(
                    WorkerUnavailable(
                        f"{what} did not arrive within {self.limits.peer_timeout:g} s (that "
                        "worker may be unreachable, or refused to deliver to this one)"
                    ),
                    "move",
                )
                return
            finally:
                entry = client.waiting.get(oid)
                if entry is not None and entry[1] is fut:
                    del client.waiting[oid]
        if error is not None:
            reason = f"{error.op} failed: {error.message}" if error.op else error.message
            session.error = session.error or ErrorReply(
                error.kind, f"{what} did not come: {reason}"[: 2 * MAX_REASON], "move"
            )

    async def _wait_for_move(
        self, fut: asyncio.Future[ErrorReply | None], client: _Client, what: str
    ) -> ErrorReply | None:
        """``fut``'s result; TimeoutError after the peer timeout. A slow wait is logged."""
        timeout = self.limits.peer_timeout
        first = min(SLOW_MOVE, timeout)
        await asyncio.wait((fut,), timeout=first)  # leaves fut pending on timeout
        if fut.done():
            return fut.result()
        log.info("%s has waited %g s for %s", client.describe(), first, what)
        return await asyncio.wait_for(fut, timeout - first)

    def _settle_move(self, target: _Client, oid: bytes, error: ErrorReply | None) -> None:
        """A move into ``target``'s session stored ``oid`` (``error`` None) or failed."""
        entry = target.waiting.pop(oid, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(error)
            return
        if error is not None:
            failed = target.failed
            failed[oid] = error
            while len(failed) > MAX_FAILED_MOVES:
                del failed[next(iter(failed))]

    def _source_lost(self, link: _Client, target: _Client) -> int:
        """The peer link ``link`` into ``target``'s session was lost (see :func:`_lost`):
        fail the moves that session is waiting for from that worker (only those: no id is
        made up); how many."""
        failed = 0
        for oid, (source, fut) in list(target.waiting.items()):
            if source != link.name or fut.done():
                continue
            failed += 1
            self._settle_move(
                target,
                oid,
                ErrorReply(
                    "WorkerUnavailable",
                    f"the connection from worker {link.name!r} ({link.where}) was lost before "
                    "it delivered the object (that worker may have died, or the network broke)",
                    None,
                ),
            )
        return failed

    def _queue_move_failure(self, msg: MoveObject, session: Session) -> None:
        """The node did not carry out ``msg``: tell the destination, which may be waiting."""
        err = session.error or ErrorReply("RemoteError", "the move was not carried out", None)
        failure = MoveFailed(msg.new_id, err.kind, err.reason(self.name)[:MAX_REASON])
        self._outbox.append((msg.destination, failure))

    def _queue_move(self, address: str, msg: Any) -> None:
        """The node's ``send_to_peer``: delivered by :meth:`_deliver` right after the message."""
        self._outbox.append((address, msg))

    async def _deliver(self, pending: list[tuple[str, Any]], session: Session) -> None:
        for address, msg in pending:
            try:
                await self._peers.deliver(address, msg)
            except VeilError as exc:
                session.fail(exc, "move")
            except Exception as exc:
                session.fail(WorkerUnavailable(f"cannot deliver to {address}: {exc!r}"), "move")

    def _log_error(self, client: _Client, text: str) -> None:
        client.errors += 1
        if client.errors <= LOGGED_ERRORS:
            log.warning("error for %s: %s", client.describe(), text[:300])
        elif client.errors == LOGGED_ERRORS + 1:
            log.warning("further errors for %s are counted, not logged", client.describe())


def _where(ws: ServerConnection) -> str:
    addr = ws.remote_address
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


def _lost(ws: ServerConnection) -> bool:
    """Whether ``ws`` ended without a closing handshake begun by either side (close code
    1006): the peer's process died or the network broke, rather than a normal close."""
    protocol = ws.protocol
    return protocol.close_rcvd is None and protocol.close_sent is None


def _keepalive(ws: ServerConnection) -> None:
    """TCP keepalive finds clients whose machine vanished without closing the connection."""
    sock = ws.transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


async def _watch_parent(stop: asyncio.Event) -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.info("parent process %d exited", parent)
    stop.set()
