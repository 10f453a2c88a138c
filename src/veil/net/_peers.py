"""Worker-to-worker delivery: how a network worker sends a moved object to another one.

A worker keeps one authenticated connection per destination session (LRU-bounded) and sends
each moved object as ``Batch([StoreObject, Query("flush")])``, so the move completes (or fails
with the destination's error) before the worker goes on with the client's next message.

How a link ends tells the destination whether to expect more from this worker: a link evicted
as the least recently used is closed with a closing handshake (the destination fails nothing;
the next delivery opens a new link), while one whose delivery failed, and every link when
the worker stops, is aborted, like a crash: the destination fails at once the moves it is
waiting for from this worker (see :mod:`veil.net._server`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import OrderedDict
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from veil._errors import AuthenticationError, VeilError, WorkerUnavailable
from veil.net._auth import SESSION_ENDED, ClientHandshake
from veil.net._frames import split_address
from veil.net._tls import client_context
from veil.serde import decode, encode
from veil.workers import Batch, ErrorReply, Query, Reply
from veil.workers._base import raise_error

_FLUSH = Query("flush")


class _Link:
    __slots__ = ("lock", "ws")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.ws: ClientConnection | None = None


class PeerLinks:
    """Connections from this worker to other workers, for moves.

    Args:
        name: this worker's name (the requester name it presents to peers).
        token: the token it proves to peers (None: connect without one).
        ca_file: PEM certificates to trust for ``wss://`` peers (default: the system's).
        timeout: seconds to connect, authenticate and deliver one object.
        max_links: connections kept open at most (the least recently used are closed, with
            a closing handshake, in the background).
    """

    def __init__(
        self,
        name: str,
        token: bytes | None,
        *,
        ca_file: str | None = None,
        timeout: float = 30.0,
        max_links: int = 64,
    ) -> None:
        self.name = name
        self.token = token
        self.ca_file = ca_file
        self.timeout = timeout
        self.max_links = max_links
        self._ssl: ssl.SSLContext | None = None
        self._links: OrderedDict[tuple[str, bytes], _Link] = OrderedDict()
        self._closing: dict[asyncio.Task[None], ClientConnection] = {}

    async def deliver(self, address: str, msg: Any) -> None:
        """Store ``msg`` (a StoreObject) on the worker at ``address``; raise its error if any.

        Raises:
            veil.WorkerUnavailable: the worker cannot be reached or dropped the connection.
            veil.AuthenticationError: it refused this worker's credentials.
            veil.VeilError: the error it reported for the object (e.g. LimitExceeded).
        """
        url, key = split_address(address)
        frame = encode(Batch([msg, _FLUSH]))  # one copy of the object's bytes
        link = self._links.get((url, key))
        if link is None:
            link = self._links[(url, key)] = _Link()
            self._evict()
        self._links.move_to_end((url, key))
        async with link.lock:
            if link.ws is not None and link.ws.state is not State.OPEN:
                link.ws.transport.abort()  # closed by the destination (e.g. idle): reopen
                link.ws = None
            try:
                if link.ws is None:
                    link.ws = await self._open(url, key)
                await link.ws.send(frame)
                data = await asyncio.wait_for(link.ws.recv(), self.timeout)
            except BaseException as exc:
                ws, link.ws = link.ws, None
                self._links.pop((url, key), None)
                if ws is not None:
                    ws.transport.abort()
                if isinstance(exc, VeilError):
                    raise
                if isinstance(
                    exc, (ConnectionClosed, OSError, TimeoutError, InvalidHandshake, InvalidURI)
                ):
                    raise WorkerUnavailable(f"cannot deliver to {url}: {_describe(exc)}") from None
                raise
        reply = decode(data)
        if type(reply) is ErrorReply:
            raise_error(reply, url)
        if type(reply) is not Reply:
            raise WorkerUnavailable(f"{url} answered a delivery with a {type(reply).__name__}")

    async def _open(self, url: str, key: bytes) -> ClientConnection:
        if url.startswith("wss:") and self._ssl is None:
            self._ssl = client_context(self.ca_file)
        ws = await ws_connect(
            url,
            ssl=self._ssl if url.startswith("wss:") else None,
            compression=None,
            open_timeout=self.timeout,
            ping_interval=None,
            close_timeout=2,
            max_size=None,
        )
        try:
            challenge = await asyncio.wait_for(ws.recv(), self.timeout)
            hs = ClientHandshake(challenge, self.token, self.name, into=key)
            await ws.send(hs.frame)
            hs.finish(await asyncio.wait_for(ws.recv(), self.timeout))
        except ConnectionClosed as exc:
            ws.transport.abort()
            rcvd = exc.rcvd
            if rcvd is not None and rcvd.code == SESSION_ENDED:
                raise WorkerUnavailable(
                    f"the receiving client's session on {url} has ended"
                ) from None
            if rcvd is not None and rcvd.code == 1008:
                raise AuthenticationError(
                    f"{url} refused worker {self.name!r}: {rcvd.reason or 'bad credentials'}"
                ) from None
            raise
        except BaseException:
            ws.transport.abort()
            raise
        return ws

    def _evict(self) -> None:
        while len(self._links) > self.max_links:
            key, link = next(iter(self._links.items()))
            if link.lock.locked():
                break
            del self._links[key]
            if link.ws is not None:
                self._close_later(link.ws)

    def _close_later(self, ws: ClientConnection) -> None:
        """Close ``ws`` normally (the destination must not take it for a crash of this
        worker), without making the delivery that evicted it wait for the handshake."""
        task = asyncio.ensure_future(ws.close())
        self._closing[task] = ws
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        ws = self._closing.pop(task, None)
        if (task.cancelled() or task.exception() is not None) and ws is not None:
            ws.transport.abort()

    async def close(self) -> None:
        """Abort every connection: to the destinations, this worker is gone (the moves they
        wait for from it fail at once)."""
        links, self._links = list(self._links.values()), OrderedDict()
        for link in links:
            if link.ws is not None:
                link.ws.transport.abort()
        closing, self._closing = dict(self._closing), {}
        for ws in closing.values():
            ws.transport.abort()
        await asyncio.gather(*closing, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
