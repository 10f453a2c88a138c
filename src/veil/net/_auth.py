"""Tokens and the authentication handshake of network workers.

Right after the WebSocket opens, before any message is handled:

1. the worker sends a *challenge*: its name, a fresh 32-byte nonce and whether it needs a token;
2. the client answers with its name, its own fresh nonce, the session it wants to store into
   (worker-to-worker moves only) and ``HMAC-SHA256(token, "client" + transcript)``;
3. the worker checks the MAC (constant time) and answers with a *welcome* carrying
   ``HMAC-SHA256(token, "server" + transcript)``, the client's session key and its limits; the
   client checks that MAC in turn (mutual authentication).

The transcript binds both nonces and all names, so a recorded answer is useless on any other
connection (the worker's nonce is new each time) and the token never travels. A connection
that fails any step is closed before anything it sent is read as a message.

The frames are plain lists in veil's wire format (:mod:`veil.serde`), not registered messages.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil._errors import AuthenticationError, SerializationError
from veil.serde import decode, encode

PROTOCOL = "veil/1"
NONCE_BYTES = 32
SESSION_KEY_BYTES = 16
#: WebSocket close code: a worker delivering a moved object names a session that has ended.
SESSION_ENDED = 4404
#: Tokens shorter than this are refused: they could be guessed.
MIN_TOKEN_CHARS = 16

_CHALLENGE = f"{PROTOCOL} challenge"
_AUTH = f"{PROTOCOL} auth"
_WELCOME = f"{PROTOCOL} welcome"


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe text) for a token file."""
    return secrets.token_urlsafe(32)


def normalize_token(token: str | bytes) -> bytes:
    """The token as bytes, surrounding whitespace removed; raises ValueError if too short."""
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, bytes):
        raise TypeError(f"a token is a str or bytes, got {type(token).__name__}")
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"a token needs at least {MIN_TOKEN_CHARS} characters")
    return token


@dataclass(frozen=True)
class TokenBook:
    """The tokens a worker accepts.

    ``shared`` authenticates a client under any name that has no token of its own; ``named``
    binds names to tokens, so that a client can claim such a name (the requester name that
    ``allowed`` lists of private data check) only with that name's token.
    """

    shared: bytes | None = None
    named: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shared is None and not self.named:
            raise ValueError("a token book needs at least one token")

    def token_for(self, client_name: str) -> bytes | None:
        """The token that ``client_name`` must prove, or None if it cannot connect."""
        return self.named.get(client_name, self.shared)

    @classmethod
    def read(cls, path: str | Path) -> TokenBook:
        """Read a token file: one line with a token, and/or lines ``NAME TOKEN``.

        Blank lines and lines starting with ``#`` are ignored.

        Raises:
            ValueError: the file is empty, malformed or holds a token that is too short.
        """
        text = Path(path).read_text(encoding="utf-8")
        shared: bytes | None = None
        named: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"{path}, line {number}"
            if len(parts) == 1:
                if shared is not None:
                    raise ValueError(f"{where}: a second shared token (use NAME TOKEN lines)")
                shared = _checked(parts[0], where)
            elif len(parts) == 2:
                if parts[0] in named:
                    raise ValueError(f"{where}: a second token for {parts[0]!r}")
                named[parts[0]] = _checked(parts[1], where)
            else:
                raise ValueError(f"{where}: expected TOKEN or NAME TOKEN")
        if shared is None and not named:
            raise ValueError(f"{path} holds no token")
        return cls(shared, named)


def _checked(token: str, where: str) -> bytes:
    try:
        return normalize_token(token)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_token(path: str | Path) -> str:
    """The single token in a token file (for clients and for worker-to-worker moves).

    Raises:
        ValueError: the file does not hold exactly one shared token.
    """
    book = TokenBook.read(path)
    if book.shared is None or book.named:
        raise ValueError(f"{path} must hold exactly one token for a client to use")
    return book.shared.decode()


# ----------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Challenge:
    """What the worker sends first."""

    worker: str
    nonce: bytes
    needs_token: bool


@dataclass(frozen=True)
class Welcome:
    """What an authenticated client learns: its session key and the worker's limits."""

    session_key: bytes
    limits: dict[str, Any]


def _transcript(
    worker: str, server_nonce: bytes, client: str, client_nonce: bytes, into: bytes
) -> bytes:
    return encode([PROTOCOL, worker, server_nonce, client, client_nonce, into])


def _mac(token: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(token, role + b"\x00" + transcript, hashlib.sha256).digest()


def make_challenge(worker: str, needs_token: bool) -> tuple[bytes, bytes]:
    """``(nonce, frame)``: a fresh challenge for a new connection."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, encode([_CHALLENGE, worker, nonce, needs_token])


def parse_challenge(frame: Any) -> Challenge:
    """Read the worker's challenge (client side).

    Raises:
        AuthenticationError: the frame is not a challenge of this protocol version.
    """
    try:
        parts = decode(frame) if isinstance(frame, (bytes, bytearray)) else None
    except SerializationError:
        parts = None
    if not (
        isinstance(parts, list)
        and len(parts) == 4
        and parts[0] == _CHALLENGE
        and type(parts[1]) is str
        and type(parts[2]) is bytes
        and len(parts[2]) == NONCE_BYTES
        and type(parts[3]) is bool
    ):
        raise AuthenticationError(f"the server did not start a {PROTOCOL} handshake")
    return Challenge(parts[1], parts[2], parts[3])


class ClientHandshake:
    """The client's half of the handshake, free of I/O (used by clients and by workers).

    Args:
        challenge: the worker's first frame.
        token: the token to prove, or None.
        client_name: the requester name to claim.
        into: the session key to store into (worker-to-worker moves), or ``b""``.
    """

    def __init__(
        self, challenge: bytes, token: bytes | None, client_name: str, into: bytes = b""
    ) -> None:
        self.challenge = parse_challenge(challenge)
        if self.challenge.needs_token and token is None:
            raise AuthenticationError(
                f"worker {self.challenge.worker!r} requires a token; pass token=..."
            )
        self.token = token
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self._transcript = _transcript(
            self.challenge.worker, self.challenge.nonce, client_name, self.nonce, into
        )
        mac = _mac(token, b"client", self._transcript) if token is not None else b""
        self.frame = encode([_AUTH, client_name, self.nonce, into, mac])

    def finish(self, frame: Any) -> Welcome:
        """Check the worker's welcome; return the session key and limits.

        Raises:
            AuthenticationError: the worker did not prove it knows the token.
        """
        try:
            parts = decode(frame) if isinstance(frame, (bytes, bytearray)) else None
        except SerializationError:
            parts = None
        if not (
            isinstance(parts, list)
            and len(parts) == 4
            and parts[0] == _WELCOME
            and type(parts[1]) is bytes
            and type(parts[2]) is bytes
            and len(parts[2]) == SESSION_KEY_BYTES
            and isinstance(parts[3], dict)
        ):
            raise AuthenticationError("the worker's welcome is malformed")
        if self.token is not None:
            expected = _mac(self.token, b"server", self._transcript)
            if not hmac.compare_digest(parts[1], expected):
                raise AuthenticationError(
                    f"worker {self.challenge.worker!r} could not prove it knows the token"
                )
        return Welcome(parts[2], parts[3])


@dataclass(frozen=True)
class ClientHello:
    """What a client claimed, once the worker has checked it."""

    name: str
    into: bytes
    token: bytes | None
    nonce: bytes


def check_auth(
    frame: Any, tokens: TokenBook | None, worker: str, server_nonce: bytes
) -> ClientHello:
    """Check a client's answer to the challenge (worker side).

    Raises:
        AuthenticationError: malformed, or the MAC does not prove the expected token.
    """
    try:
        parts = decode(frame) if isinstance(frame, (bytes, bytearray)) else None
    except SerializationError:
        parts = None
    if not (
        isinstance(parts, list)
        and len(parts) == 5
        and parts[0] == _AUTH
        and type(parts[1]) is str
        and 0 < len(parts[1]) <= 200
        and type(parts[2]) is bytes
        and len(parts[2]) == NONCE_BYTES
        and type(parts[3]) is bytes
        and len(parts[3]) in (0, SESSION_KEY_BYTES)
        and type(parts[4]) is bytes
    ):
        raise AuthenticationError("malformed authentication frame")
    _, name, client_nonce, into, mac = parts
    if tokens is None:
        return ClientHello(name, into, None, client_nonce)
    token = tokens.token_for(name)
    if token is None:
        raise AuthenticationError(f"no token is configured for client {name!r}")
    transcript = _transcript(worker, server_nonce, name, client_nonce, into)
    if not hmac.compare_digest(mac, _mac(token, b"client", transcript)):
        raise AuthenticationError(f"client {name!r} did not prove the token")
    return ClientHello(name, into, token, client_nonce)


def make_welcome(
    hello: ClientHello, worker: str, server_nonce: bytes, session_key: bytes, limits: dict[str, Any]
) -> bytes:
    """The worker's welcome for an authenticated client."""
    transcript = _transcript(worker, server_nonce, hello.name, hello.nonce, hello.into)
    mac = _mac(hello.token, b"server", transcript) if hello.token is not None else b""
    return encode([_WELCOME, mac, session_key, limits])
