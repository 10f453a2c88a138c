"""Framing: pre-encoded messages joined into a Batch; addresses naming a session."""

from __future__ import annotations

import pytest
import torch

import veil
from veil.net._frames import batch_frame, session_address, split_address
from veil.serde import decode, encode
from veil.workers import Batch, Query, StoreObject, new_id


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 65_535, 65_536, 70_000])
def test_batch_frame_is_the_encoding_of_a_batch(n):
    msgs = [Query("count") for _ in range(n)]
    if n:
        msgs[0] = StoreObject(new_id(), torch.arange(5.0))
    frame = batch_frame([encode(m) for m in msgs])
    if n < 100:
        assert frame == encode(Batch(msgs))
    got = decode(frame)
    assert type(got) is Batch and len(got.messages) == n


def test_session_addresses():
    key = bytes(range(16))
    address = session_address("ws://127.0.0.1:8777", key)
    assert address == f"ws://127.0.0.1:8777/?veil-session={key.hex()}"
    assert split_address(address) == ("ws://127.0.0.1:8777/", key)
    assert split_address("wss://h:1/p?x=1") == ("wss://h:1/p?x=1", b"")
    for bad in ("virtual://alice#1", "http://h:1/", "ws://h:1/?veil-session=zz"):
        with pytest.raises(veil.WorkerUnavailable):
            split_address(bad)
