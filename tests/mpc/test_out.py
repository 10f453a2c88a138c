"""``out=`` variants of the ops on fixed-point and shared values write their result into
``out`` (a handler for the whole op packet used to answer them and leave ``out`` unchanged)."""

from __future__ import annotations

import pytest
import torch

from tests.mpc.helpers import local_parties, reveal, shared
from veil.mpc.fixed import OPS
from veil.mpc.sharing import OPS as SHARED_OPS

PARTIES, PROVIDER = local_parties(2)

ENCODERS = [
    ("fixed", lambda t: t.fix_precision(), lambda t: t.float_precision().double()),
    ("shared", lambda t: shared(t, PARTIES, PROVIDER), reveal),
]

CASES = [
    ("mm", lambda a, b, out: torch.mm(a, b, out=out), (3, 3)),
    ("matmul", lambda a, b, out: torch.matmul(a, b, out=out), (3, 3)),
    ("cat", lambda a, b, out: torch.cat([a, b], out=out), (6, 3)),
    ("stack", lambda a, b, out: torch.stack([a, b], out=out), (2, 3, 3)),
    ("sigmoid", lambda a, b, out: torch.sigmoid(a, out=out), (3, 3)),
    ("exp", lambda a, b, out: torch.exp(a, out=out), (3, 3)),
    ("neg", lambda a, b, out: torch.neg(a, out=out), (3, 3)),
    ("tanh", lambda a, b, out: torch.tanh(a, out=out), (3, 3)),
    ("maximum", lambda a, b, out: torch.maximum(a, b, out=out), (3, 3)),
]


@pytest.mark.parametrize("name,encode,decode", ENCODERS)
@pytest.mark.parametrize("case,call,shape", CASES)
def test_out_variants_write_their_result(name, encode, decode, case, call, shape):
    torch.manual_seed(0)
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    expected = call(a, b, torch.empty(shape))
    out = encode(torch.zeros(shape))
    returned = call(encode(a), encode(b), out)
    assert returned is out
    assert torch.allclose(decode(out), expected.double(), atol=1e-3)


@pytest.mark.parametrize("name,encode,decode", ENCODERS)
def test_an_out_view_writes_into_its_base(name, encode, decode):
    base = encode(torch.zeros(2, 3))
    torch.mm(encode(torch.ones(1, 2)), encode(torch.ones(2, 3)), out=base[1:])
    expected = torch.tensor([[0.0] * 3, [2.0] * 3], dtype=torch.float64)
    assert torch.equal(decode(base), expected)


def test_wrong_outs_are_refused():
    a = torch.ones(2, 2).fix_precision()
    with pytest.raises(NotImplementedError, match="cannot be resized"):
        torch.cat([a, a], out=torch.zeros(3, 2).fix_precision())
    with pytest.raises(TypeError, match="plain"):
        torch.mm(a, a, out=torch.zeros(2, 2))
    s = torch.ones(2, dtype=torch.long).share(*PARTIES, crypto_provider=PROVIDER)
    o = torch.zeros(2, dtype=torch.long).share(*PARTIES, crypto_provider=PROVIDER)
    with pytest.raises(NotImplementedError, match="out="):
        torch.neg(s, out=o)


@pytest.mark.parametrize("registry", [OPS, SHARED_OPS], ids=["fixed", "shared"])
def test_every_out_overload_of_a_registered_packet_is_handled_as_out(registry):
    checked = 0
    for key, handler in list(registry.table.items()):
        if not hasattr(key, "overloads"):
            continue  # an overload registered on its own
        for name in key.overloads():
            overload = getattr(key, name)
            if any(arg.is_out for arg in overload._schema.arguments):
                assert registry.lookup(overload) is not handler, overload
                checked += 1
    assert checked > 10
