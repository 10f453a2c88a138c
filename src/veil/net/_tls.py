"""TLS contexts for network workers. Verification is always on: there is no option to skip it."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or newer) for a worker's certificate chain and key.

    Raises:
        ValueError: the files cannot be read as a certificate and its key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load TLS certificate {cert_file} and key {key_file}: {exc}"
        ) from exc
    return ctx


def client_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """A TLS client context that verifies the worker's certificate and host name.

    ``ca_file`` pins the certificate authorities trusted (a self-signed worker certificate
    can be its own CA); without it the system's trusted authorities are used.

    Raises:
        ValueError: ``ca_file`` cannot be read as PEM certificates.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only the pinned authorities
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA file {ca_file}: {exc}") from exc
    if ctx.verify_mode != ssl.CERT_REQUIRED or not ctx.check_hostname:
        raise RuntimeError("TLS client context does not verify certificates")  # never happens
    return ctx
