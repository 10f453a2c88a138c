"""How messages travel in WebSocket frames, and how a worker's address names a session.

Every binary frame a client sends is one message or a :class:`~veil.workers.Batch` of them,
handled in order; the worker answers every frame with exactly one reply frame: the reply of
the frame's last message if that message asks for one, else ``Reply(None)``. A client buffers
its pipelined messages and sends them in the same frame as its next request.

Messages are encoded when they are submitted (so a tensor is sent as it was then, and a value
that cannot travel raises at the call that sent it); :func:`batch_frame` joins the encoded
messages into the bytes of a ``Batch`` without encoding them again.
"""

from __future__ import annotations

import struct
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgpack

from veil._errors import WorkerUnavailable
from veil.serde import encode
from veil.serde._codec import join_encoding, split_encoding
from veil.workers import Batch


def _batch_layout() -> tuple[int, bytes]:
    """The extension code and payload prefix of an encoded Batch, found from the codec."""
    ext = msgpack.unpackb(encode(Batch([])), ext_hook=lambda code, data: (code, data))
    code, payload = ext
    if not payload.endswith(b"\x90"):  # the empty list of messages
        raise RuntimeError("unexpected encoding of Batch; update veil.net._frames")
    return code, payload[:-1]


_BATCH_EXT, _BATCH_PREFIX = _batch_layout()


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def batch_frame(parts: list[bytes]) -> bytes:
    """The encoding of ``Batch(messages)`` given each message already encoded.

    The messages' documents go into the batch's document, and their tensors' bytes (framed
    encodings) after it, in the same order: each byte of a tensor is copied once here.
    """
    docs = []
    payloads = []
    for part in parts:
        doc, payload = split_encoding(part)
        docs.append(doc)
        if payload:
            payloads.append(payload)
    doc = msgpack.packb(
        msgpack.ExtType(_BATCH_EXT, b"".join([_BATCH_PREFIX, _array_header(len(parts)), *docs]))
    )
    return join_encoding(doc, payloads) if payloads else doc


#: The query parameter of a worker address that names the session to store moved objects in.
SESSION_PARAM = "veil-session"


def session_address(url: str, session_key: bytes) -> str:
    """The address of a client's session on the worker at ``url`` (for moves to it)."""
    scheme, netloc, path, query, _ = urlsplit(url)
    params = [(k, v) for k, v in parse_qsl(query) if k != SESSION_PARAM]
    params.append((SESSION_PARAM, session_key.hex()))
    return urlunsplit((scheme, netloc, path or "/", urlencode(params), ""))


def split_address(address: str) -> tuple[str, bytes]:
    """``(url, session_key)`` of a worker address; the key is ``b""`` if there is none.

    Raises:
        WorkerUnavailable: the address is not a ``ws://`` or ``wss://`` URL.
    """
    scheme, netloc, path, query, _ = urlsplit(address)
    if scheme not in ("ws", "wss") or not netloc:
        raise WorkerUnavailable(f"a network worker cannot reach {address!r}")
    key = b""
    params = []
    for k, v in parse_qsl(query):
        if k == SESSION_PARAM:
            try:
                key = bytes.fromhex(v)
            except ValueError:
                raise WorkerUnavailable(f"malformed session in address {address!r}") from None
        else:
            params.append((k, v))
    return urlunsplit((scheme, netloc, path or "/", urlencode(params), "")), key
