"""The wire format: round trips, and hostile bytes raise SerializationError only."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil import SerializationError
from veil.serde import DTYPES, GradRef, Ref, decode, encode
from veil.workers import (
    Batch,
    DeleteObjects,
    ErrorReply,
    ExecuteCommand,
    FetchObject,
    MoveObject,
    Query,
    Reply,
    SearchObjects,
    StoreModule,
    StoreObject,
)

ID = b"\x01" * 16


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.requires_grad == b.requires_grad and torch.equal(a.detach(), b.detach()))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            _same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b and type(a) is type(b)


MESSAGES = [
    StoreObject(ID, torch.randn(3, 2, requires_grad=True), ("#a",), "d", True, ("bob",),
                ("alice",)),
    FetchObject(ID, True),
    DeleteObjects((ID, b"\x02" * 16)),
    ExecuteCommand("torch.add", (Ref(ID), GradRef(ID), 2.5, None, (1, [2, 3])),
                   {"alpha": 2, "dim": torch.Size([1]), "dtype": torch.int64,
                    "idx": (slice(1, None, 2), Ellipsis)}, (ID, None)),
    SearchObjects(("#x", "#y")),
    MoveObject(ID, "ws://127.0.0.1:1", b"\x03" * 16),
    Query("grads", (ID,)),
    StoreModule(ID, {"type": "Linear", "args": {"in_features": 2}, "children": {},
                     "training": True}, {"weight": torch.ones(2)}, {"weight": ID}),
    Batch([Query("flush"), FetchObject(ID)]),
    Reply([1, "x", torch.arange(4)]),
    ErrorReply("PermissionDenied", "no", "torch.add"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert _same(msg, decode(encode(msg)))


@pytest.mark.parametrize("dtype", sorted(DTYPES.values(), key=str), ids=str)
def test_tensors_round_trip_every_dtype(dtype):
    t = (torch.randn(3, 4) * 10).to(dtype)
    assert _same(t, decode(encode(t)))
    assert _same(t[:, 1], decode(encode(t[:, 1])))  # non-contiguous
    assert _same(torch.empty(0, 3, dtype=dtype), decode(encode(torch.empty(0, 3, dtype=dtype))))


def test_unsupported_values_are_refused():
    for bad in (object(), torch.ones(2).to_sparse(), lambda: 0, 2**70, {"a": {1, "b"}}):
        with pytest.raises(SerializationError):
            encode(bad)


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300)
@given(values)
def test_plain_values_round_trip(v):
    out = decode(encode(v))
    assert out == v


@settings(max_examples=6000)
@given(st.binary(max_size=200))
def test_random_bytes_raise_serialization_error_only(data):
    with contextlib.suppress(SerializationError):
        decode(data)


@settings(max_examples=4000)
@given(st.sampled_from(MESSAGES), st.data())
def test_truncated_and_mutated_messages_raise_serialization_error_only(msg, data):
    raw = bytearray(encode(msg))
    cut = data.draw(st.integers(0, len(raw)))
    mutated = raw[:cut]
    if mutated and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(SerializationError):
        decode(bytes(mutated))


def _inline(t: torch.Tensor) -> bytes:
    """A tensor in the unframed layout (bytes inline in its extension), as encodings made
    before framing (e.g. older checkpoints) hold it."""
    import msgpack

    code = {v: k for k, v in DTYPES.items()}[t.dtype]
    header = msgpack.packb([code, list(t.shape), t.requires_grad])
    return msgpack.packb(msgpack.ExtType(1, header + t.detach().numpy().tobytes()))


def test_unframed_tensors_still_decode():
    t = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(decode(_inline(t)), t)
    assert not encode([1, "x"]).startswith(b"\xc1")  # no tensors: one plain document
    assert encode(t).startswith(b"\xc1")


def test_hostile_tensor_headers():
    import msgpack

    # a header claiming a huge shape with few bytes must not allocate or hang
    for header in ([4, [2**39, 2**39], False], [99, [2], False], [0, [-1], False],
                   [0, [2] * 40, False], [4, [2], True], "x"):
        payload = msgpack.packb(header) + b"\x00" * 8
        with pytest.raises(SerializationError):
            decode(msgpack.packb(msgpack.ExtType(1, payload)))  # unframed
        framed = msgpack.packb(msgpack.ExtType(11, msgpack.packb(header)))
        with pytest.raises(SerializationError):
            decode(b"\xc1" + len(framed).to_bytes(4, "little") + framed + b"\x00" * 8)


def _framed(doc: bytes, payload: bytes, claimed: int | None = None) -> bytes:
    n = len(doc) if claimed is None else claimed
    return b"\xc1" + n.to_bytes(4, "little") + doc + payload


def test_framed_payloads_must_match_their_headers_exactly():
    import msgpack

    header = msgpack.packb(msgpack.ExtType(11, msgpack.packb([4, [2], False])))  # 16 bytes
    assert decode(_framed(header, bytes(16))).tolist() == [0, 0]
    for payload in (bytes(15), bytes(17), b""):  # too few, a stray byte, none
        with pytest.raises(SerializationError):
            decode(_framed(header, payload))
    with pytest.raises(SerializationError):  # a header outside a frame
        decode(header + bytes(16))
    for bad in (b"\xc1", b"\xc1\x00\x00", _framed(header, bytes(16), claimed=1000),
                _framed(header, bytes(16), claimed=3)):
        with pytest.raises(SerializationError):
            decode(bad)


tensors = st.builds(
    lambda shape, dtype, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                * 100).to(dtype),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.int8]),
    st.integers(0, 2**16),
)
nested = st.recursive(
    tensors | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=2), inner, max_size=3)
    | st.builds(lambda v: Reply(v), inner)
    | st.builds(lambda vs: Batch([StoreObject(ID, v) for v in vs]), st.lists(inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=300)
@given(nested)
def test_nested_tensors_each_get_their_own_bytes(v):
    """Framed payloads are handed out in document order, through every kind of nesting."""
    assert _same(v, decode(encode(v)))


def test_non_contiguous_and_zero_dim_tensors_round_trip():
    for t in (torch.arange(12).reshape(3, 4).t(), torch.tensor(3.5), torch.zeros(0, 3),
              torch.arange(10.0)[::3], torch.ones(2, 2, dtype=torch.bfloat16)):
        assert _same(t.contiguous(), decode(encode(t)))


def test_non_string_map_keys_are_refused_on_decode():
    import msgpack

    with pytest.raises(SerializationError):
        decode(msgpack.packb({1: 2}))


def test_deep_nesting_is_refused():
    data = b"\x91" * 100_000 + b"\xc0"  # 100,000 nested one-element arrays
    with pytest.raises(SerializationError):
        decode(data)


SOURCE = Path(__file__).resolve().parents[2] / "src" / "veil"
FORBIDDEN = re.compile(
    r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bdill\b|torch\.load\b|\beval\(|\bexec\(|"
    r"__import__\(|importlib\.import_module|\bmarshal\b|\bshelve\b|yaml\.load\("
)


def test_no_unsafe_deserialization_anywhere_in_veil():
    offenders = []
    for path in SOURCE.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(SOURCE)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
