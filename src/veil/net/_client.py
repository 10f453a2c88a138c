"""The client's handle on a network worker: :func:`connect` and :class:`WebSocketWorker`.

Moves between two network workers go worker to worker and cost the client no round trip.
A ``MoveObject`` submitted to the source's handle puts an :class:`~veil.workers._messages.
AwaitObject` for the new id into the destination handle's stream, right after what is already
buffered there: the destination worker waits (without blocking its other connections) until
the object has arrived, or the source reports that the move failed, or the source's
connection into the destination is lost (the source died: the wait fails at once with
``WorkerUnavailable``), before it handles what the client sent after it. The one ordering
rule on this side: before a handle sends a frame, the sources of the moves its buffered
``AwaitObject`` messages wait for have sent the frames that carry those moves (the
destination would otherwise wait for an object no worker was asked to send). An
``AwaitObject`` whose move is known to be finished (the source answered the frame that
carried it) or lost (the source's connection closed) is left out.
"""

from __future__ import annotations

import ssl
import threading
import weakref
from pathlib import Path
from typing import Any

from veil._errors import LimitExceeded, WorkerUnavailable
from veil.net._auth import ClientHandshake, Welcome, normalize_token
from veil.net._conn import BlockingConnection
from veil.net._frames import batch_frame, session_address, split_address
from veil.net._tls import client_context
from veil.serde import decode, encode
from veil.workers import DeleteObjects, ErrorReply, MoveObject, Reply, Worker
from veil.workers._messages import AwaitObject

#: Buffered messages are sent early (without waiting for a request) past this many bytes...
FLUSH_BYTES = 8 << 20
#: ...or this many messages.
FLUSH_MESSAGES = 4096
#: Early frames whose acknowledgements are not read yet, at most.
MAX_UNACKED = 8
#: Room left in a frame for the Batch around the messages.
_FRAME_OVERHEAD = 64

#: Open handles by address, so that a move to one of them can order itself (see _submit).
_HANDLES: weakref.WeakValueDictionary[str, WebSocketWorker] = weakref.WeakValueDictionary()


class _Await:
    """A buffered ``AwaitObject``: its bytes and the frame of the source that moves the object."""

    __slots__ = ("conn", "data", "seq", "source")

    def __init__(self, data: bytes, source: WebSocketWorker) -> None:
        self.data = data
        self.source = source
        self.conn = source._conn
        self.seq = source._sent_seq + 1  # the move is in the source's next frame

    def needed(self) -> bool:
        """Whether the destination must still wait: the move may not have happened yet."""
        source = self.source
        return source._conn is self.conn and self.conn.open and source._done_seq < self.seq


def connect(
    url: str,
    *,
    token: str | bytes | None = None,
    timeout: float = 60.0,
    name: str = "me",
    ca_file: str | Path | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_reply: int | None = 1 << 32,
) -> WebSocketWorker:
    """Connect to a network worker (``veil worker``); same API as a :class:`~veil.VirtualWorker`.

    Args:
        url: ``ws://host:port`` or ``wss://host:port`` (TLS).
        token: the worker's token (the content of its token file), proved without being sent.
        timeout: seconds any step may wait for the worker; past it (or when the connection
            drops) calls raise :class:`veil.WorkerUnavailable`.
        name: the requester name presented to the worker (what ``allowed`` lists of private
            data name).
        ca_file: PEM certificates to trust for ``wss://`` (e.g. the worker's self-signed
            certificate); default: the system's trusted authorities.
        ssl_context: a TLS client context to use instead of ``ca_file``.
        max_reply: largest reply accepted, in bytes (None: no limit).

    Raises:
        veil.WorkerUnavailable: the worker cannot be reached.
        veil.AuthenticationError: the token (or the worker's certificate) was not accepted.
    """
    return WebSocketWorker(
        url,
        token=token,
        timeout=timeout,
        name=name,
        ca_file=ca_file,
        ssl_context=ssl_context,
        max_reply=max_reply,
    )


class WebSocketWorker(Worker):
    """A handle on a worker served by ``veil worker``, over one WebSocket connection.

    Pipelined messages are encoded at once and buffered; they travel in the same frame as the
    next request, or sooner: after a ``backward`` the buffered step starts on its way and the
    caller goes on without waiting (which leaves got gradients is predicted from the
    pointers' lineage and checked by the worker), so a training loop streams its steps and
    waits only where it needs a value. Use it from one thread at a
    time (calls from several threads are serialized). Closing it (or losing the connection)
    makes the worker release every object this handle created there.

    Counters for benchmarks: ``messages``, ``frames``, ``round_trips``, ``bytes_sent``,
    ``bytes_received``.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | bytes | None = None,
        timeout: float = 60.0,
        name: str = "me",
        ca_file: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_reply: int | None = 1 << 32,
    ) -> None:
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty str")
        base, key = split_address(url)
        if key:
            raise ValueError("connect to a worker's URL, not to a session address")
        if ssl_context is None and base.startswith("wss:"):
            ssl_context = client_context(ca_file)
        elif ca_file is not None and ssl_context is not None:
            raise ValueError("pass ca_file or ssl_context, not both")
        self.url = url
        self.timeout = float(timeout)
        self._token = normalize_token(token) if token is not None else None
        self._ssl = ssl_context
        self._max_reply = max_reply
        self._lock = threading.RLock()
        self._pending: list[bytes | _Await] = []
        self._pending_bytes = 0
        self._awaits = 0  # _Await entries in _pending
        self._sending = False  # sending a frame: the sources of its moves are being pushed
        self._sent_seq = 0  # frames sent on this connection
        self._done_seq = 0  # frames of this connection whose reply has been read
        self._unacked = 0
        self._ack_error: ErrorReply | None = None
        self._after: weakref.WeakSet[WebSocketWorker] = weakref.WeakSet()
        self.messages = 0
        self.frames = 0
        self.round_trips = 0
        self._old_sent = 0
        self._old_received = 0
        conn, welcome, worker = self._open(name)
        super().__init__(worker, client_name=name)
        self._install(conn, welcome)

    # ------------------------------------------------------------------ connection

    def _open(self, client_name: str) -> tuple[BlockingConnection, Welcome, str]:
        conn = BlockingConnection(
            self.url, timeout=self.timeout, ssl_context=self._ssl, max_size=self._max_reply
        )
        try:
            hs = ClientHandshake(conn.recv(), self._token, client_name)
            conn.name = f"worker {hs.challenge.worker!r} at {self.url}"
            conn.send(hs.frame)
            welcome = hs.finish(conn.recv())
        except BaseException:
            conn.abort()
            raise
        return conn, welcome, hs.challenge.worker

    def _install(self, conn: BlockingConnection, welcome: Welcome) -> None:
        self._conn = conn
        self._sent_seq = 0
        self._done_seq = 0
        self.limits = dict(welcome.limits)
        self._max_frame = int(self.limits.get("max_frame", 1 << 31))
        self._address = session_address(self.url, welcome.session_key)
        _HANDLES[self._address] = self

    @property
    def address(self) -> str:
        """This handle's session on the worker: moves to it store objects it owns there."""
        return self._address

    @property
    def connected(self) -> bool:
        """Whether the connection is open."""
        return self._conn.open

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the worker (WebSocket framing included), over all connections."""
        return self._old_sent + self._conn.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes read from the worker, over all connections."""
        return self._old_received + self._conn.bytes_received

    def close(self) -> None:
        """Close the connection; the worker releases the objects this handle created."""
        with self._lock:
            self._clear_pending()
            self._conn.close()

    def reconnect(self) -> None:
        """Open a fresh connection (a new session: earlier pointers are no longer valid)."""
        with self._lock:
            self._conn.abort()
            conn, welcome, worker = self._open(self.client_name)
            if worker != self.name:
                conn.abort()
                raise WorkerUnavailable(f"{self.url} is now worker {worker!r}, not {self.name!r}")
            self._old_sent += self._conn.bytes_sent
            self._old_received += self._conn.bytes_received
            self._clear_pending()
            self._unacked = 0
            self._ack_error = None
            self._gc.clear()
            self._grad_clears.clear()
            _HANDLES.pop(self._address, None)
            self._install(conn, welcome)

    def __enter__(self) -> WebSocketWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self._conn.open else " (closed)"
        return f"<WebSocketWorker {self.name} at {self.url}{state}>"

    # ------------------------------------------------------------------ transport

    def _submit(self, msg: Any) -> None:
        if self._gc and type(msg) is not DeleteObjects:
            # Remote objects whose pointers died are deleted before what comes next, in the
            # same frame: the worker's memory (and the client's object budget) follows the
            # program's.
            self._flush_gc()
        data = encode(msg)  # now: the value as it is, and errors at the call that sent it
        with self._lock:
            if len(data) + _FRAME_OVERHEAD > self._max_frame:
                raise LimitExceeded(
                    f"a {type(msg).__name__} of {len(data)} bytes is over worker "
                    f"{self.name}'s frame limit of {self._max_frame} bytes"
                )
            if self._buffer_full(len(data)):
                self._send_early()
            self._pending.append(data)
            self._pending_bytes += len(data)
            self.messages += 1
        if type(msg) is MoveObject:
            # Nothing sent to the destination after this may run before this worker has
            # delivered the object: the destination worker waits for it (see the module
            # docstring). Crossing moves (alice -> bob and bob -> alice, each followed by a
            # use of what came in) are fine: each worker waits only for moves submitted
            # before the wait, and handles its peers' deliveries while it waits.
            dest = _HANDLES.get(msg.destination)
            if dest is not None and dest is not self and dest._conn.open:
                dest._expect(self, msg.new_id)

    def _buffer_full(self, nbytes: int) -> bool:
        """Whether the buffered messages go out before ``nbytes`` more are buffered."""
        return (
            self._pending_bytes + nbytes + _FRAME_OVERHEAD > min(self._max_frame, FLUSH_BYTES)
            or len(self._pending) >= FLUSH_MESSAGES
        )

    def _expect(self, source: WebSocketWorker, new_id: bytes) -> None:
        """Buffer an ``AwaitObject`` for the object ``source`` is moving here as ``new_id``."""
        data = encode(AwaitObject(new_id, source.name))
        entry = _Await(data, source)  # before an early send here may push the source
        with self._lock:
            if self._buffer_full(len(data)):
                self._send_early()
            self._pending.append(entry)
            self._pending_bytes += len(data)
            self._awaits += 1
            self.messages += 1
            self._after.add(source)

    def _push_sources(self) -> None:
        """Have the sources of the buffered moves into this worker send their frames.

        Called before this handle sends a frame. A source that is itself sending (a cycle:
        crossing moves) sends right after; the frames of one such cycle are all written
        before the client waits for any reply, and each worker waits only for moves the
        program submitted before the wait, so no worker waits for one that is never sent.
        """
        self._sending = True
        try:
            while self._after:
                source = self._after.pop()
                if not source._sending:
                    source._push()
        finally:
            self._sending = False

    def _take_frame(self) -> bytes:
        """The buffered messages as one frame (the buffer is emptied)."""
        if self._awaits:
            parts = [
                p if type(p) is bytes else p.data
                for p in self._pending
                if type(p) is bytes or p.needed()  # type: ignore[union-attr]
            ]
        else:
            parts = self._pending  # type: ignore[assignment]
        frame = batch_frame(parts)  # type: ignore[arg-type]
        self._clear_pending()
        return frame

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        self._awaits = 0

    _predict_grads = True

    def _push(self) -> None:
        with self._lock:
            self._send_early()

    def _send_early(self) -> None:
        """Send the buffered messages now; their acknowledgement is read later."""
        if not self._pending:
            return
        if self._after:
            self._push_sources()
            if not self._pending:
                return
        self._send(self._take_frame())
        self._unacked += 1
        while self._unacked > MAX_UNACKED:
            self._read_ack()

    def _read_ack(self) -> None:
        reply = self._recv()
        self._unacked -= 1
        if type(reply) is ErrorReply and self._ack_error is None:
            self._ack_error = reply

    def _send_request(self, msg: Any) -> Reply | ErrorReply:
        data = encode(msg)
        with self._lock:
            if self._pending_bytes + len(data) + _FRAME_OVERHEAD > self._max_frame:
                self._send_early()
            if len(data) + _FRAME_OVERHEAD > self._max_frame:
                raise LimitExceeded(
                    f"a {type(msg).__name__} of {len(data)} bytes is over worker "
                    f"{self.name}'s frame limit of {self._max_frame} bytes"
                )
            if self._after:
                self._push_sources()
            self._pending.append(data)
            self.messages += 1
            self._send(self._take_frame())
            while self._unacked:
                self._read_ack()
            reply = self._recv()
            self.round_trips += 1
            if self._ack_error is not None:
                reply, self._ack_error = self._ack_error, None
            return reply

    def _send(self, frame: bytes) -> None:
        if not self._conn.open:
            raise WorkerUnavailable(
                f"the connection to worker {self.name} at {self.url} is closed; "
                "call .reconnect() or veil.connect() again"
            )
        self.frames += 1
        self._sent_seq += 1
        self._conn.send(frame)

    def _recv(self) -> Reply | ErrorReply:
        data = self._conn.recv()
        self._done_seq += 1
        try:
            reply = decode(data)
        except Exception as exc:
            self._conn.abort()
            raise WorkerUnavailable(
                f"worker {self.name} sent an undecodable reply: {exc}"
            ) from None
        if type(reply) is not Reply and type(reply) is not ErrorReply:
            self._conn.abort()
            raise WorkerUnavailable(f"worker {self.name} answered with a {type(reply).__name__}")
        return reply


__all__ = ["WebSocketWorker", "connect"]
