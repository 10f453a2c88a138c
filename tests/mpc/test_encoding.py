"""Fixed-point encoding: exact round trips, negatives, overflow, scalar multipliers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import veil
from veil.mpc import encoding
from veil.mpc.encoding import decode, encode, scalar_multiplier


@settings(max_examples=60)
@given(st.lists(st.integers(-(2**61) + 1, 2**61 - 1), min_size=1, max_size=20), st.integers(0, 24))
@example(ints=[-72_057_594_037_927_937], bits=3)  # integer part not exact in float64
def test_decode_of_encode_is_exact_for_representable_values(ints, bits):
    v = torch.tensor(ints, dtype=torch.int64)
    x = decode(v, bits, torch.float64)
    exact = [i / 2**bits for i in ints]
    # float64 holds every value exactly when |i| < 2^53; otherwise the nearest double
    for got, want, i in zip(x.tolist(), exact, ints):
        if abs(i) < 2**53:
            assert got == want
        else:
            assert got == float(want)


def _nearest_float32_of_int(i: int) -> int:
    """The integer nearest to ``i`` with 24 significant bits (ties to even): float32(i)."""
    m, shift = abs(i), max(0, abs(i).bit_length() - 24)
    q, r = divmod(m, 1 << shift)
    half = 1 << shift >> 1
    if shift and (r > half or (r == half and q & 1)):
        q += 1
    return (q << shift) * (1 if i >= 0 else -1)


@settings(max_examples=60)
@given(st.lists(st.integers(-(2**62) + 1, 2**62 - 1), min_size=1, max_size=20), st.integers(0, 24))
def test_decode_to_float32_rounds_once(ints, bits):
    got = decode(torch.tensor(ints, dtype=torch.int64), bits, torch.float32).tolist()
    for g, i in zip(got, ints):
        assert g == _nearest_float32_of_int(i) / 2**bits


@settings(max_examples=60)
@given(st.lists(st.integers(-(2**30), 2**30), min_size=1, max_size=20))
def test_roundtrip_float32(ints):
    x = torch.tensor(ints, dtype=torch.float64).div(2**16).float()
    assert torch.equal(decode(encode(x)), x)


def test_negative_values_just_below_integers_decode_exactly():
    # CrypTen's decoder returns -3.0 - 1.0 here; veil splits integer part and fraction.
    values = [-3 - 2**-16, -1 - 2**-16, -(2**-16), -1.0, -(2**20) - 2**-16, -0.5 - 2**-16]
    x = torch.tensor(values, dtype=torch.float64)
    assert torch.equal(decode(encode(x), 16, torch.float64), x)
    assert torch.equal(decode(encode(x.float())), x.float())


def test_rounding_to_nearest():
    x = torch.tensor([0.1, -0.1, 1 / 3, -1 / 3])
    err = (decode(encode(x), 16, torch.float64) - x.double()).abs()
    assert float(err.max()) <= 2**-17 + 1e-12


@pytest.mark.parametrize("value", [2.0**46, -(2.0**46), float("nan"), float("inf"), -float("inf")])
def test_out_of_range_raises(value):
    with pytest.raises(veil.PrecisionOverflow):
        encode(torch.tensor([0.0, value], dtype=torch.float64))
    with pytest.raises(veil.PrecisionOverflow):
        torch.tensor([value], dtype=torch.float64).fix_precision()


def test_largest_representable_value_encodes():
    big = 2.0**46 - 1.0
    assert decode(encode(torch.tensor([big], dtype=torch.float64)), 16, torch.float64).item() == big


def test_integer_tensors_and_range():
    assert torch.equal(encode(torch.tensor([3, -2])), torch.tensor([3 << 16, -2 << 16]))
    with pytest.raises(veil.PrecisionOverflow):
        encode(torch.tensor([2**46]))


@pytest.mark.parametrize("bits", [-1, 41, 2.5, "16"])
def test_precision_validation(bits):
    with pytest.raises(ValueError):
        encode(torch.tensor([1.0]), bits)


@settings(max_examples=100)
@given(st.floats(1e-6, 1e6) | st.floats(-1e6, -1e-6))
def test_scalar_multiplier_keeps_24_bits(value):
    m, s = scalar_multiplier(value)
    assert abs(m / 2**s - value) <= abs(value) * 2**-23
    assert abs(m) < 2**24


def test_wrap():
    assert encoding.wrap(2**63) == -(2**63)
    assert encoding.wrap(-(2**63) - 1) == 2**63 - 1
    assert math.isclose(decode(torch.tensor([1]), 16).item(), 2**-16)
