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


_BATCHES = st.sampled_from([(), (1,), (2,), (3,), (2, 2), (1, 3)])


@settings(max_examples=40, deadline=None)
@given(_BATCHES, _BATCHES, st.integers(0, 97), st.integers(0, 9), st.integers(0, 7),
       st.integers(2, 4))
def test_threaded_native_matmul_is_identical(a_batch, b_batch, m, k, n, threads):
    """Rows or batch entries cut across threads, written in place: the same tensor as
    torch's single call, for every broadcast of the batch dimensions."""
    try:
        batch = torch.broadcast_shapes(a_batch, b_batch)
    except RuntimeError:
        return
    a, b = random_int64((*a_batch, m, k)), random_int64((*b_batch, k, n))
    calls = []
    before = (limbs.PARALLEL_MIN_WORK, limbs._matmul_into, torch.get_num_threads())

    def counted(*args):
        calls.append(args[2].shape)
        before[1](*args)

    try:
        limbs.PARALLEL_MIN_WORK, limbs._matmul_into = 0, counted
        torch.set_num_threads(threads)
        out = limbs.matmul(a, b)
    finally:
        limbs.PARALLEL_MIN_WORK, limbs._matmul_into = before[:2]
        torch.set_num_threads(before[2])
    assert torch.equal(out, torch.matmul(a, b))
    products = int(torch.tensor(batch).prod()) if batch else 1
    rows = m if b_batch else m * products  # a 2-D b: torch folds a's batch into rows
    if m * k * n and (products > 1 or rows >= 2 * limbs._ROWS_PER_BLOCK):
        assert len(calls) >= 2  # the work was cut, and each block written in place
        assert sum(torch.Size(c).numel() for c in calls) == out.numel()


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
