"""Helpers for the network tests: raw authenticated connections, certificates, free ports."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from veil.net import WorkerProcess
from veil.net._auth import ClientHandshake, Welcome, normalize_token
from veil.net._conn import BlockingConnection


def raw_connect(
    url: str, token: str | None, *, name: str = "me", timeout: float = 10.0
) -> tuple[BlockingConnection, Welcome]:
    """A WebSocket connection that has passed the handshake, for sending frames by hand."""
    conn = BlockingConnection(url, timeout=timeout, ssl_context=None, max_size=None)
    hs = ClientHandshake(conn.recv(), normalize_token(token) if token else None, name)
    conn.send(hs.frame)
    return conn, hs.finish(conn.recv())


def stop_all(procs: list[WorkerProcess]) -> None:
    """Stop worker processes: all are asked at once, then each is waited for."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop()


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """``(cert.pem, key.pem)``: a fresh self-signed certificate for ``host``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file
