"""TLS: wss:// with a self-signed certificate made here; verification cannot be skipped."""

from __future__ import annotations

import pytest
import torch

import veil
from tests.net._util import self_signed_cert
from veil.net import connect
from veil.net._process import started_workers

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--peer-ca-file", str(cert)]
    token = veil.net.new_token()
    spec = {"token": token, "args": args, "scheme": "wss"}
    with started_workers(("alice", spec), ("bob", spec)) as procs:
        yield procs[0], procs[1], cert


def test_wss_with_a_pinned_self_signed_certificate(tls_pair):
    a, b, cert = tls_pair
    assert a.url.startswith("wss://")
    with (
        connect(a.url, token=a.token, ca_file=cert, timeout=10) as alice,
        connect(b.url, token=b.token, ca_file=cert, timeout=10) as bob,
    ):
        x = torch.arange(6.0).send(alice)
        y = (x * 2).move(bob)  # alice's worker verifies bob's certificate too
        assert torch.equal(y.get(), torch.arange(6.0) * 2)


def test_an_unverifiable_certificate_is_refused(tls_pair, tmp_path):
    a, _, _ = tls_pair
    with pytest.raises(veil.AuthenticationError, match="certificate"):
        connect(a.url, token=a.token, timeout=10)  # not in the system's trusted authorities
    (tmp_path / "other").mkdir()
    other, _ = self_signed_cert(tmp_path / "other")
    with pytest.raises(veil.AuthenticationError, match="certificate"):
        connect(a.url, token=a.token, ca_file=other, timeout=10)  # a different certificate


def test_plain_websocket_to_a_tls_worker_fails_cleanly(tls_pair):
    a, _, cert = tls_pair
    with pytest.raises(veil.WorkerUnavailable):
        connect(a.url.replace("wss://", "ws://"), token=a.token, timeout=5)
    with pytest.raises(ValueError, match="not a wss"):
        connect(
            a.url.replace("wss://", "ws://"),
            token=a.token,
            timeout=5,
            ssl_context=veil.net._tls.client_context(cert),
        )
