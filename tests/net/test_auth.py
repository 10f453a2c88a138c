"""Authentication: a connection proves the token (HMAC over fresh nonces) before anything runs."""

from __future__ import annotations

import pytest
import torch

import veil
from tests.net._util import raw_connect
from veil.net import TokenBook, connect, new_token, read_token
from veil.net._auth import ClientHandshake, check_auth, make_challenge, normalize_token
from veil.net._conn import BlockingConnection
from veil.net._frames import batch_frame
from veil.serde import encode
from veil.workers import Query, StoreObject, new_id

pytestmark = pytest.mark.network


def test_right_token_works_and_wrong_or_missing_token_is_refused(alice):
    with connect(alice.url, token=alice.token, timeout=10) as w:
        assert w.name == "alice"
        assert torch.equal((torch.ones(2).send(w) * 3).get(), torch.full((2,), 3.0))
    with pytest.raises(veil.AuthenticationError, match="requires a token"):
        connect(alice.url, timeout=10)
    with pytest.raises(veil.AuthenticationError, match="check the token"):
        connect(alice.url, token=new_token(), timeout=10)
    assert "refused" in alice.log() and "did not prove the token" in alice.log()


def test_nothing_sent_by_a_refused_connection_runs(alice):
    """A client with a bad MAC that pipelines messages right behind it: none is handled."""
    oid = new_id()
    work = batch_frame([encode(StoreObject(oid, torch.ones(3))), encode(Query("count"))])
    attempts = []
    # 1. a wrong token, with work queued right behind the authentication frame
    conn = BlockingConnection(alice.url, timeout=10, ssl_context=None, max_size=None)
    hs = ClientHandshake(conn.recv(), normalize_token(new_token()), "me")
    conn.send(hs.frame)
    conn.send(work)
    attempts.append(conn)
    # 2. no authentication frame at all: a message first
    conn = BlockingConnection(alice.url, timeout=10, ssl_context=None, max_size=None)
    conn.recv()
    conn.send(work)
    conn.send(work)
    attempts.append(conn)
    for conn in attempts:
        with pytest.raises(veil.AuthenticationError):
            conn.recv()
    with connect(alice.url, token=alice.token, timeout=10) as w:
        assert w.object_count() == 0


def test_a_recorded_authentication_cannot_be_replayed(alice):
    conn, _ = raw_connect(alice.url, alice.token)
    conn.close()
    # Record a valid answer for one connection...
    first = BlockingConnection(alice.url, timeout=10, ssl_context=None, max_size=None)
    hs = ClientHandshake(first.recv(), normalize_token(alice.token), "me")
    recorded = hs.frame
    first.send(recorded)
    hs.finish(first.recv())
    # ...and send it on another: the worker's nonce differs, so the MAC does not verify.
    second = BlockingConnection(alice.url, timeout=10, ssl_context=None, max_size=None)
    second.recv()
    second.send(recorded)
    with pytest.raises(veil.AuthenticationError):
        second.recv()
    first.close()


def test_the_token_never_travels():
    token = normalize_token(new_token())
    nonce, challenge = make_challenge("alice", True)
    hs = ClientHandshake(challenge, token, "me")
    assert token not in hs.frame
    book = TokenBook(token)
    hello = check_auth(hs.frame, book, "alice", nonce)
    assert hello.name == "me" and hello.token == token
    with pytest.raises(veil.AuthenticationError):
        check_auth(hs.frame, book, "alice", make_challenge("alice", True)[0])  # other nonce
    with pytest.raises(veil.AuthenticationError):
        check_auth(hs.frame, book, "bob", nonce)  # answer meant for another worker


def test_client_with_a_token_refuses_a_worker_that_cannot_prove_it(spawn):
    open_worker = spawn("open", token=None)
    with pytest.raises(veil.AuthenticationError, match="could not prove"):
        connect(open_worker.url, token=new_token(), timeout=10)
    with connect(open_worker.url, timeout=10) as w:  # no token on either side: loopback only
        assert (torch.ones(1).send(w) + 1).get().item() == 2.0


def test_named_tokens_bind_requester_names_and_hosted_data(spawn, tmp_path):
    shared, carol = new_token(), new_token()
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# who may connect\n{shared}\ncarol {carol}\n")
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    w = spawn(
        "dana",
        token=None,
        args=["--token-file", str(token_file), "--data", f"table={csv}", "--allow", "carol"],
    )
    with connect(w.url, token=carol, name="carol", timeout=10) as c:
        (ptr,) = c.search("#table")
        assert ptr.description.startswith("d.csv: 2 rows x 2 columns")
        assert torch.equal(ptr.get(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(veil.AuthenticationError):
        connect(w.url, token=shared, name="carol", timeout=10)  # carol has her own token
    with connect(w.url, token=shared, name="me", timeout=10) as me:
        (ptr,) = me.search("#table")
        assert (ptr.sum() > 0).shape == ()  # computing on it is fine
        with pytest.raises(veil.PermissionDenied, match="private to dana"):
            ptr.get()


def test_token_files(tmp_path):
    f = tmp_path / "t"
    f.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        TokenBook.read(f)
    f.write_text("")
    with pytest.raises(ValueError, match="no token"):
        TokenBook.read(f)
    f.write_text(f"{new_token()}\n{new_token()}\n")
    with pytest.raises(ValueError, match="second shared token"):
        TokenBook.read(f)
    f.write_text(f"a b {new_token()}\n")
    with pytest.raises(ValueError, match="NAME TOKEN"):
        TokenBook.read(f)
    token = new_token()
    f.write_text(f"  {token}  \n")
    assert read_token(f) == token
    f.write_text(f"bob {token}\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_token(f)
