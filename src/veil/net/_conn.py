"""A blocking WebSocket client connection: the ``websockets`` protocol driven from the caller.

The pointer API is synchronous, and a round trip is the unit of its cost, so the client drives
``websockets``' Sans-I/O :class:`~websockets.client.ClientProtocol` on a plain blocking socket
in the calling thread: a request is one ``sendall`` and a reply one or a few ``recv`` calls,
with no hand-off to another thread or event loop. (Measured on loopback: about 2/3 of the round
trip of ``websockets.sync.client``, which reads in a background thread.)

Every read waits at most ``timeout`` seconds; a connection that fails, closes or times out
raises :class:`veil.WorkerUnavailable` (or :class:`veil.AuthenticationError` during the
handshake) and cannot be used again.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections import deque

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import CLOSED, CONNECTING, OPEN
from websockets.uri import parse_uri

from veil._errors import AuthenticationError, LimitExceeded, VeilError, WorkerUnavailable

_READ_SIZE = 1 << 18


def _closed_error(code: int | None, reason: str, where: str) -> VeilError:
    """The exception for a connection that the worker closed with ``code``."""
    detail = f"{where} closed the connection" + (f" ({code}: {reason})" if code else "")
    if code == CloseCode.POLICY_VIOLATION:
        return AuthenticationError(f"{detail}; check the token")
    if code == CloseCode.MESSAGE_TOO_BIG:
        return LimitExceeded(f"{detail}: a message was over the worker's frame limit")
    if code == CloseCode.TRY_AGAIN_LATER:
        return WorkerUnavailable(f"{detail}: it serves too many clients, try again later")
    return WorkerUnavailable(detail)


class BlockingConnection:
    """One WebSocket connection, used by one thread at a time.

    Args:
        url: ``ws://host:port/`` or ``wss://host:port/``.
        timeout: seconds any connect, send or read may take.
        ssl_context: for ``wss://`` URLs (required then).
        max_size: largest message accepted from the worker, or None.
        name: how errors name the other side.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        max_size: int | None,
        name: str | None = None,
    ) -> None:
        try:
            uri = parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {url!r} ({exc})") from None
        self.url = url
        self.name = name or url
        self.timeout = timeout
        self._messages: deque[bytes] = deque()
        self._fragments: list[bytes] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        if uri.secure and ssl_context is None:
            raise ValueError("a wss:// URL needs a TLS context")
        if not uri.secure and ssl_context is not None:
            raise ValueError(f"TLS was configured but {url!r} is not a wss:// URL")
        try:
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        except OSError as exc:
            raise WorkerUnavailable(f"cannot connect to {url}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=uri.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise AuthenticationError(
                f"the TLS certificate of {url} could not be verified: {exc.verify_message}"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise WorkerUnavailable(f"TLS handshake with {url} failed: {exc}") from None
        self.sock = sock
        self.protocol = ClientProtocol(uri, max_size=max_size)
        try:
            self.protocol.send_request(self.protocol.connect())
            self._write()
            while self.protocol.state is CONNECTING:
                self._read()
                for event in self.protocol.events_received():
                    if not isinstance(event, Response):
                        self._event(event)  # a first frame can come with the response
            self._write()
            if self.protocol.handshake_exc is not None:
                raise WorkerUnavailable(
                    f"WebSocket handshake with {url} failed: {self.protocol.handshake_exc}"
                )
            if self.protocol.state is not OPEN:
                # Accepted, then closed in the same read (a worker serving too many
                # clients): report the worker's reason, as a later close would be.
                raise self._closed()
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ I/O

    @property
    def open(self) -> bool:
        """Whether the connection can still be used."""
        return self.sock is not None and self.protocol.state is OPEN

    def _write(self) -> None:
        data = self.protocol.data_to_send()
        if not data:
            return
        eof = data[-1] == b""
        out = b"".join(data)
        try:
            if out:
                self.sock.sendall(out)
                self.bytes_sent += len(out)
            if eof:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.abort()
            raise WorkerUnavailable(f"connection to {self.name} lost: {exc}") from None

    def _read(self) -> None:
        if self.sock is None:
            raise WorkerUnavailable(f"connection to {self.name} is closed")
        try:
            data = self.sock.recv(_READ_SIZE)
        except TimeoutError:
            self.abort()
            raise WorkerUnavailable(
                f"{self.name} did not answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            self.abort()
            raise WorkerUnavailable(f"connection to {self.name} lost: {exc}") from None
        if data:
            self.bytes_received += len(data)
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()

    def send(self, data: bytes) -> None:
        """Send one binary message."""
        if not self.open:
            raise self._closed()
        self.protocol.send_binary(data)
        self._write()

    def recv(self) -> bytes:
        """The next binary message from the worker (waiting at most ``timeout`` per read)."""
        while not self._messages:
            if self.sock is None or self.protocol.state is CLOSED:
                raise self._closed()
            self._read()
            for event in self.protocol.events_received():
                self._event(event)
            self._write()  # pongs and close answers
            if self.protocol.state is not OPEN and not self._messages:
                raise self._closed()
        return self._messages.popleft()

    def _event(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.BINARY:
            if frame.fin:
                self._messages.append(bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
        elif op is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                self._messages.append(b"".join(self._fragments))
                self._fragments = None
        elif op is Opcode.TEXT:
            self.protocol.fail(CloseCode.UNSUPPORTED_DATA, "binary frames only")

    def _closed(self) -> VeilError:
        rcvd = self.protocol.close_rcvd
        exc = self.protocol.parser_exc
        if exc is not None and rcvd is None:
            err = _closed_error(self.protocol.close_code, str(exc), self.name)
        elif rcvd is not None:
            err = _closed_error(rcvd.code, rcvd.reason, self.name)
        else:
            err = WorkerUnavailable(f"connection to {self.name} is closed")
        self.abort()
        return err

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close the connection politely (waits briefly for the worker's answer)."""
        if self.sock is None:
            return
        try:
            if self.protocol.state is OPEN:
                self.protocol.send_close(code, reason)
                self._write()
                self.sock.settimeout(min(self.timeout, 2.0))
                while self.protocol.state is not CLOSED:
                    self._read()
                    self.protocol.events_received()
        except (VeilError, OSError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
