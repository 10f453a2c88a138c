"""Exact ring matmul and convolution: native int64 and float64 over limbs, mod 2^64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc import limbs
from veil.mpc._random import random_int64

MASK = (1 << 64) - 1


def reference_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    al, bl = a.tolist(), b.tolist()
    out = []
    for row in al:
        out.append([])
        for j in range(len(bl[0])):
            s = sum(row[k] * bl[k][j] for k in range(len(bl))) & MASK
            out[-1].append(s - (1 << 64) if s >= 1 << 63 else s)
    return torch.tensor(out, dtype=torch.int64)


@settings(max_examples=25)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 6))
def test_limb_and_native_matmul_are_exact_mod_2_64(m, k, n):
    a, b = random_int64((m, k)), random_int64((k, n))
    ref = reference_matmul(a, b)
    assert torch.equal(limbs.limb_matmul(a, b), ref)
    assert torch.equal(torch.matmul(a, b), ref)


def test_limb_matmul_chunks_long_inner_dimension():
    a, b = random_int64((3, 2500)), random_int64((2500, 2))
    assert torch.equal(limbs.limb_matmul(a, b), reference_matmul(a, b))


@settings(max_examples=10)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(0, 1))
def test_limb_conv2d_matches_native(cin, cout, stride, padding):
    x, w = random_int64((2, cin, 6, 5)), random_int64((cout, cin, 3, 2))
    native = F.conv2d(x, w, None, stride, padding)
    assert torch.equal(limbs.limb_conv2d(x, w, stride, padding), native)


def test_native_conv_is_exact_mod_2_64():
    x, w = random_int64((1, 2, 3, 3)), random_int64((1, 2, 2, 2))
    out = F.conv2d(x, w)
    xs, ws = x.tolist()[0], w.tolist()[0]
    s = sum(xs[c][i][j] * ws[c][i][j] for c in range(2) for i in range(2) for j in range(2))
    s &= MASK
    assert out[0, 0, 0, 0].item() == (s - (1 << 64) if s >= 1 << 63 else s)


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((256, 70), (70, 9)), ((97, 5), (5, 3)), ((3, 70, 4), (4, 6)), ((2, 65, 3), (2, 3, 5))],
)
def test_threaded_native_matmul_is_identical(monkeypatch, a_shape, b_shape):
    monkeypatch.setattr(limbs, "PARALLEL_MIN_WORK", 0)
    a, b = random_int64(a_shape), random_int64(b_shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        out = limbs.matmul(a, b)
        torch.set_num_threads(1)  # one thread: the plain kernel, and a smaller pool next time
        single = limbs.matmul(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, torch.matmul(a, b)) and torch.equal(single, out)
    if a_shape[-2] >= 64:  # at least two blocks of rows ran on the pool
        assert limbs._pool is not None and limbs._pool[1] >= 2


def test_backend_switch():
    a, b = random_int64((4, 5)), random_int64((5, 3))
    try:
        limbs.set_backend("limbs")
        assert torch.equal(limbs.matmul(a, b), torch.matmul(a, b))
    finally:
        limbs.set_backend("int64")
    with pytest.raises(ValueError):
        limbs.set_backend("float")


def test_limb_conv_rejects_inexact_sizes():
    with pytest.raises(ValueError):
        limbs.limb_conv2d(random_int64((1, 100, 6, 6)), random_int64((1, 100, 3, 3)))
