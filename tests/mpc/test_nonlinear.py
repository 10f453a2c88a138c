"""Comparisons, ReLU, max/argmax, pooling and the approximations, with their error bounds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import veil.mpc
from tests.mpc.helpers import ULP, local_parties, reveal, shaped_tensors, shared, worker_parties
from veil.mpc import approximations as A

PARTIES, PROVIDER = local_parties(2)


def sh(x: torch.Tensor):
    return shared(x, PARTIES, PROVIDER)


@settings(max_examples=20)
@given(shaped_tensors(bound=1e6))
def test_comparisons_are_exact(x):
    y = torch.roll(x, 1, 0)
    y.view(-1)[0] = x.view(-1)[0]  # at least one tie
    a, b = sh(x), sh(y)
    for op in ("gt", "lt", "ge", "le", "eq", "ne"):
        got = getattr(torch, op)(a, b).get().float_precision()
        assert got.dtype == torch.bool
        assert torch.equal(got, getattr(torch, op)(x, y)), op
    assert torch.equal((a > 0.5).get().float_precision(), x > 0.5)
    assert torch.equal((a <= y).get().float_precision(), x <= y)


@settings(max_examples=20)
@given(shaped_tensors(bound=1e6))
def test_relu_abs_sign_max_min_where(x):
    a = sh(x)
    d = x.double()
    assert torch.equal(reveal(torch.relu(a)), torch.relu(d))
    assert torch.equal(reveal(F.relu(a)), torch.relu(d))
    assert torch.equal(reveal(a.abs()), d.abs())
    assert torch.equal(reveal(torch.sign(a)), torch.sign(d))
    y = torch.flip(x, [0])
    assert torch.equal(reveal(torch.maximum(a, sh(y))), torch.maximum(d, y.double()))
    assert torch.equal(reveal(torch.minimum(a, sh(y))), torch.minimum(d, y.double()))
    assert torch.equal(reveal(torch.where(a > 0, a, sh(y))), torch.where(x > 0, d, y.double()))
    assert torch.equal(reveal(a.clamp(-1.0, 2.0)), d.clamp(-1.0, 2.0))


@settings(max_examples=15)
@given(shaped_tensors(max_side=7, bound=1e4), st.data())
def test_max_and_argmax_over_a_dim(x, data):
    dim = data.draw(st.integers(0, x.dim() - 1))
    x = x + torch.arange(x.numel()).reshape(x.shape) * 1e-3  # distinct values: unique argmax
    a = sh(x)
    values, indices = torch.max(a, dim)
    ref_v, ref_i = torch.max(x, dim)
    assert torch.allclose(reveal(values), ref_v.double(), atol=ULP)
    assert torch.equal(indices.get().float_precision(), ref_i)
    assert torch.equal(torch.argmax(a, dim).get().float_precision(), torch.argmax(x, dim))
    assert torch.equal(torch.argmax(a).get().float_precision(), torch.argmax(x))
    assert torch.allclose(reveal(a.max()), x.max().double(), atol=ULP)
    assert torch.allclose(
        reveal(a.amax(dim, keepdim=True)), x.amax(dim, keepdim=True).double(), atol=ULP
    )
    values, indices = torch.min(a, dim)
    ref_v, ref_i = torch.min(x, dim)
    assert torch.allclose(reveal(values), ref_v.double(), atol=ULP)
    assert torch.equal(indices.get().float_precision(), ref_i)
    assert torch.equal(torch.argmin(a, dim).get().float_precision(), torch.argmin(x, dim))
    assert torch.allclose(reveal(a.min()), x.min().double(), atol=ULP)
    assert torch.allclose(reveal(a.amin(dim)), x.amin(dim).double(), atol=ULP)


@pytest.mark.parametrize(
    "kernel,stride,padding,ceil_mode",
    [
        (2, 2, 0, False),
        (3, 1, 0, False),
        (2, 1, 0, False),
        (3, 2, 1, False),  # ResNet's stem
        (3, 2, 1, True),
        (2, 2, 0, True),
        ((3, 2), (2, 1), (1, 1), True),
    ],
)
def test_max_pool2d_and_its_gradient(kernel, stride, padding, ceil_mode):
    torch.manual_seed(0)
    _check_max_pool(F.max_pool2d, torch.randn(2, 3, 7, 6) * 10, kernel, stride, padding, 1,
                    ceil_mode)


def _check_max_pool(pool, x: torch.Tensor, *args) -> None:
    """``pool(x, *args)`` on shared values against torch, values and gradients."""
    x = x.requires_grad_()
    ref = pool(x, *args)
    a = sh(x.detach()).requires_grad_()
    if ref.isinf().any():  # a window of padding only: -inf, not a fixed-point value
        with pytest.raises(ValueError, match="padding only"):
            pool(a, *args)
        return
    got = pool(a, *args)
    assert got.shape == ref.shape
    assert torch.allclose(reveal(got), ref.double(), atol=ULP)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=2 * ULP)


def test_max_pool2d_padding_is_never_the_maximum():
    x = -torch.rand(1, 1, 4, 4) * 1e6 - 1e6  # all far below zero, the padding of plaintext
    got = reveal(F.max_pool2d(sh(x), 3, 2, 1, ceil_mode=True))
    assert torch.allclose(got, F.max_pool2d(x, 3, 2, 1, ceil_mode=True).double(), atol=ULP)
    with pytest.raises(ValueError, match="dilation"):
        F.max_pool2d(sh(x), 2, dilation=(0, 1))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.data())
def test_dilated_max_pooling_and_its_gradient(d, data):
    """Any kernel, stride, padding, dilation and ceil_mode torch accepts, 1-D to 3-D, forward
    and gradient against torch."""
    kernel = tuple(data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    dilation = tuple(data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    stride = tuple(data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in kernel)
    ceil_mode = data.draw(st.booleans())
    spans = [v * (k - 1) + 1 for k, v in zip(kernel, dilation)]
    size = tuple(data.draw(st.integers(max(1, s - 2 * p), s + 3)) for s, p in zip(spans, padding))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    x = torch.randn(2, 2, *size) * 10
    _check_max_pool(pool, x, kernel, stride, padding, dilation, ceil_mode)


@pytest.mark.parametrize(
    "args",
    [
        (2,),
        (3, 1, 1),
        (3, 2, 1, True),  # ceil_mode: windows past the padded edge
        (3, 2, 1, False, False),  # count_include_pad=False: per-window divisors
        (3, 2, 1, True, False),
        ((3, 2), (2, 1), (1, 0), True, False),
        (3, 1, 1, False, True, 5),  # divisor_override
    ],
)
def test_avg_pool2d_and_its_gradient(args):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 7, 6) * 10).requires_grad_()
    a = sh(x.detach()).requires_grad_()
    ref, got = F.avg_pool2d(x, *args), F.avg_pool2d(a, *args)
    assert got.shape == ref.shape
    assert torch.allclose(reveal(got), ref.double(), atol=4 * ULP)  # one rounding
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    # each input sums up to kh * kw rounded window gradients: up to 9 units apart
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=12 * ULP)


@pytest.mark.parametrize(
    "pool,args,shape",
    [
        (F.max_pool3d, (2,), (2, 2, 4, 5, 4)),
        (F.max_pool3d, (3, 2, 1, 1, True), (1, 2, 5, 6, 5)),  # padding, ceil_mode
        (F.max_pool3d, ((2, 1, 2), (1, 1, 2)), (2, 5, 4, 4)),  # unbatched
        (F.max_pool2d, (2,), (3, 4, 5)),  # unbatched 2-D
        (F.avg_pool3d, (2,), (2, 2, 4, 5, 4)),
        (F.avg_pool3d, (3, 2, 1, True, False), (1, 2, 5, 6, 5)),  # per-window divisors
        (F.avg_pool3d, (2, 1, 0, False, True, 3), (1, 2, 4, 4, 3)),  # divisor_override
        (F.avg_pool2d, (2,), (3, 4, 5)),
        (F.adaptive_avg_pool3d, (1,), (2, 3, 4, 4, 2)),  # global average pooling
        (F.adaptive_max_pool2d, (1,), (2, 3, 4, 6)),  # global max pooling
        (F.adaptive_max_pool2d, ((2, 3),), (2, 3, 4, 6)),
        (F.adaptive_max_pool3d, ((2, 1, 1),), (1, 2, 4, 4, 2)),
        (F.adaptive_max_pool1d, (2,), (2, 3, 6)),
    ],
)
def test_3d_and_unbatched_pooling_and_their_gradients(pool, args, shape):
    torch.manual_seed(2)
    x = (torch.randn(shape) * 10).requires_grad_()
    a = sh(x.detach()).requires_grad_()
    ref, got = pool(x, *args), pool(a, *args)
    assert got.shape == ref.shape
    assert torch.allclose(reveal(got), ref.double(), atol=4 * ULP)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    # each input sums up to 27 rounded window gradients (3x3x3 average windows)
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=32 * ULP)


@pytest.mark.parametrize("args", [(2,), (3, 2, 1), (2, 1, 0, 1, True)])
def test_max_pool1d_and_its_gradient(args):
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 9) * 10).requires_grad_()
    a = sh(x.detach()).requires_grad_()
    ref, got = F.max_pool1d(x, *args), F.max_pool1d(a, *args)
    assert torch.allclose(reveal(got), ref.double(), atol=ULP)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=2 * ULP)


# Each approximation: (function, reference, domain, error metric, bound), as stated in the
# docstrings of veil.mpc.approximations.
def _abs(got, ref):
    return (got - ref).abs()


def _rel_plus_ulps(rel):
    def err(got, ref):
        return ((got - ref).abs() - rel * ref.abs()) / ULP

    return err


def _rel_or_abs(scale):
    def err(got, ref):
        return (got - ref).abs() / torch.clamp(ref.abs(), min=scale)

    return err


APPROX = {
    "exp": (A.exp, torch.exp, (-20.0, 20.0), _rel_or_abs(1.0), 2e-4),
    "exp_low": (A.exp, torch.exp, (-384.0, -20.0), _abs, 3e-5),
    "exp_very_low": (A.exp, torch.exp, (-1e5, -384.0), _abs, 3e-5),  # raised to -384
    "sigmoid": (A.sigmoid, torch.sigmoid, (-384.0, 384.0), _abs, 1e-4),
    "sigmoid_wide": (A.sigmoid, torch.sigmoid, (-1e5, 1e5), _abs, 1e-4),  # clamped to ±384
    "tanh": (A.tanh, torch.tanh, (-192.0, 192.0), _abs, 2e-4),
    "tanh_wide": (A.tanh, torch.tanh, (-1e5, 1e5), _abs, 2e-4),
    "erf": (A.erf, torch.erf, (-12.0, 12.0), _abs, 6e-4),
}
# Square roots, reciprocals and logarithms reduce their input by powers of four over
# [2^-14, 2^44): 1e-5 relative plus one unit in the last place (measured in ULPs beyond the
# relative part), and 3e-5 absolute for the logarithm.
for _lo, _hi in ((2.0**-14, 1.0), (1.0, 2.0**20), (2.0**20, 2.0**43.9)):
    for _name, _fn, _ref in (
        ("sqrt", A.sqrt, torch.sqrt),
        ("rsqrt", A.rsqrt, torch.rsqrt),
        ("reciprocal", lambda t: A.reciprocal(t, positive=True), torch.reciprocal),
        ("reciprocal_neg", lambda t: A.reciprocal(-t), lambda t: -torch.reciprocal(t)),
    ):
        APPROX[f"{_name}_{_lo:.0e}"] = (_fn, _ref, (_lo, _hi), _rel_plus_ulps(1e-5), 1.0)
    APPROX[f"log_{_lo:.0e}"] = (A.log, torch.log, (_lo, _hi), _abs, 3e-5)


@pytest.mark.parametrize("name", sorted(APPROX))
def test_approximation_error_over_its_domain(name):
    fn, ref_fn, (lo, hi), metric, bound = APPROX[name]
    x = torch.cat([torch.linspace(lo, hi, 400), torch.empty(200).uniform_(lo, hi)])
    if lo > 0:  # spread over the magnitudes too
        x = torch.cat([x, torch.exp(torch.empty(200).uniform_(math.log(lo), math.log(hi)))])
    got = reveal(fn(sh(x)))
    ref = ref_fn((x.double() * 2**16).round() / 2**16)  # of the encoded input
    worst = float(metric(got, ref).max())
    assert worst <= bound, f"{name}: max error {worst:.3g} > {bound}"


def test_approximations_via_torch_ops():
    x = torch.linspace(-5, 5, 50)
    a = sh(x)
    assert torch.allclose(reveal(torch.sigmoid(a)), torch.sigmoid(x).double(), atol=1e-4)
    assert torch.allclose(reveal(torch.tanh(a)), torch.tanh(x).double(), atol=2e-4)
    assert torch.allclose(reveal(torch.exp(a)), torch.exp(x).double(), rtol=2e-4, atol=1e-4)
    pos = sh(x.abs() + 0.5)
    assert torch.allclose(reveal(torch.sqrt(pos)), (x.abs() + 0.5).sqrt().double(), rtol=1e-3)
    assert torch.allclose(reveal(1 / pos), 1 / (x.abs() + 0.5).double(), rtol=1e-3)
    assert torch.allclose(reveal(a / pos), x.double() / (x.abs() + 0.5), atol=2e-3)
    assert torch.allclose(reveal(torch.log(pos)), (x.abs() + 0.5).log().double(), atol=2e-3)


@pytest.mark.parametrize("e", [-2, -1.5, -0.75, -0.5, -0.25, 0.25, 0.75, 1.5, 2.25])
def test_fractional_and_negative_powers(e):
    """Multiples of 1/4 from square roots (LocalResponseNorm's 0.75, LPPool's -0.5) and
    negative integers from the reciprocal, for positive values, with gradients."""
    x = torch.exp(torch.linspace(math.log(0.2), math.log(8.0), 60)).requires_grad_()
    a = sh(x.detach()).requires_grad_()
    ref, got = x**e, a**e
    assert torch.allclose(reveal(got), ref.double(), rtol=2e-4, atol=5 * ULP)
    ref.sum().backward()
    got.sum().backward()
    assert torch.allclose(reveal(a.grad), x.grad.double(), rtol=1e-3, atol=1e-3)


def test_local_response_norm_and_lp_pooling_train():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 4).requires_grad_()
    a = sh(x.detach()).requires_grad_()
    for layer in (nn.LocalResponseNorm(2), nn.LPPool2d(2, 2)):
        ref, got = layer(x), layer(a)
        assert torch.allclose(reveal(got), ref.double(), atol=1e-3)
        ref.sum().backward()
        got.sum().backward()
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=2e-2)


def test_softmax_log_softmax_and_logsumexp():
    x = torch.randn(6, 10) * 4
    a = sh(x)
    assert torch.allclose(reveal(torch.softmax(a, 1)), torch.softmax(x, 1).double(), atol=1e-3)
    assert torch.allclose(reveal(torch.softmax(a, 0)), torch.softmax(x, 0).double(), atol=1e-3)
    assert torch.allclose(reveal(F.log_softmax(a, 1)), F.log_softmax(x, 1).double(), atol=3e-3)
    for dim, keepdim in ((1, False), (0, True)):
        ref = torch.logsumexp(x.double(), dim, keepdim=keepdim)
        assert torch.allclose(reveal(torch.logsumexp(a, dim, keepdim=keepdim)), ref, atol=3e-3)
    a.requires_grad_()
    xr = x.clone().requires_grad_()
    torch.logsumexp(a, 1).sum().backward()
    torch.logsumexp(xr, 1).sum().backward()
    assert torch.allclose(reveal(a.grad), xr.grad.double(), atol=3e-3)


def test_comparison_over_workers_and_three_parties():
    parties, provider = worker_parties(3)
    x = torch.tensor([-3.5, 0.0, 2.25, -1e-4])
    a = shared(x, parties, provider)
    assert torch.equal(reveal(torch.relu(a)), torch.relu(x).double())
    assert torch.equal((a >= 0).get().float_precision(), x >= 0)


def test_precision_limit_of_approximations():
    x = torch.tensor([1.0]).fix_precision(30)
    with pytest.raises(ValueError, match="precision_bits"):
        veil.mpc.approximations.exp(x)


@pytest.mark.parametrize("serialize", [False, True])
def test_approximations_on_shares_held_by_workers(serialize):
    """The approximations' protocol steps pass lists of shares: they must run on the workers."""
    parties, provider = worker_parties(2, serialize=serialize)
    x = torch.linspace(-3, 3, 13)
    a = shared(x, parties, provider)
    for fn, tol in ((torch.sigmoid, 1e-3), (torch.tanh, 1e-3), (torch.exp, 1e-2)):
        got = reveal(fn(a))
        want = fn(x).to(got.dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))


@settings(max_examples=15, deadline=None)
@given(shaped_tensors(max_side=5, bound=100.0), st.data())
def test_max_and_min_gradients_match_plaintext(x, data):
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1))
    keepdim = data.draw(st.booleans())
    x = x + torch.arange(x.numel()).reshape(x.shape) * 1e-3  # a unique maximum per slice
    for reduce in (
        lambda t: torch.max(t, dim, keepdim=keepdim).values,
        lambda t: torch.min(t, dim, keepdim=keepdim).values,
        lambda t: t.amax(dim, keepdim=keepdim),
        lambda t: t.amin(dim),
        lambda t: t.max(),
        lambda t: t.min(),
    ):
        ref_x = x.clone().requires_grad_()
        out = reduce(ref_x)
        g = torch.randn(out.shape)
        out.backward(g)
        a = sh(x).requires_grad_()
        reduce(a).backward(sh(g))
        assert torch.allclose(reveal(a.grad), ref_x.grad.double(), atol=2 * ULP)


def test_amax_gradient_splits_ties_like_torch():
    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    ref_x = x.clone().requires_grad_()
    ref_x.amax(1).sum().backward()
    a = sh(x).requires_grad_()
    a.amax(1).sum().backward()
    # the secret tie count (1/2, 1/3) goes through the reciprocal approximation
    assert torch.allclose(reveal(a.grad), ref_x.grad.double(), atol=1e-4)


#: Convolutions beyond plain 2-D ones, each with input, weight and bias gradients.
CONVOLUTIONS = [
    ("conv1d_padded", lambda: torch.nn.Conv1d(3, 6, 3, padding=1), (2, 3, 10)),
    ("conv1d_strided", lambda: torch.nn.Conv1d(3, 6, 3, stride=2, dilation=2), (2, 3, 10)),
    ("conv1d_grouped", lambda: torch.nn.Conv1d(3, 6, 3, groups=3), (2, 3, 10)),
    ("conv2d_grouped", lambda: torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    ("transposed", lambda: torch.nn.ConvTranspose2d(4, 3, 3, stride=2), (2, 4, 5, 5)),
    (
        "transposed_grouped",
        lambda: torch.nn.ConvTranspose2d(
            4, 6, 3, stride=2, padding=1, output_padding=1, groups=2
        ),
        (2, 4, 5, 4),
    ),
    (
        "transposed_dilated",
        lambda: torch.nn.ConvTranspose2d(4, 2, (3, 2), stride=(1, 2), dilation=2),
        (1, 4, 4, 4),
    ),
    (
        "transposed_1d",
        lambda: torch.nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1),
        (2, 3, 7),
    ),
    ("conv3d", lambda: torch.nn.Conv3d(2, 3, 2), (2, 2, 4, 3, 3)),
    (
        "conv3d_strided_grouped",
        lambda: torch.nn.Conv3d(
            2, 4, (3, 2, 2), stride=(2, 1, 1), padding=1, dilation=(1, 2, 1), groups=2
        ),
        (2, 2, 5, 5, 4),
    ),
    (
        "transposed_3d",
        lambda: torch.nn.ConvTranspose3d(2, 3, 2, stride=2, output_padding=1),
        (1, 2, 3, 2, 2),
    ),
]


@pytest.mark.parametrize("name,make,shape", CONVOLUTIONS, ids=[c[0] for c in CONVOLUTIONS])
def test_convolutions_and_their_gradients(name, make, shape):
    """Grouped ones take one weight-gradient product per group (one round)."""
    torch.manual_seed(4)
    conv = make()
    secure = copy.deepcopy(conv).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    x = torch.randn(shape).requires_grad_()
    a = sh(x.detach()).requires_grad_()
    ref, got = conv(x), secure(a)
    assert got.shape == ref.shape
    assert torch.allclose(reveal(got), ref.double(), atol=1e-3)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=1e-3)
    for p, q in zip(secure.parameters(), conv.parameters(), strict=True):
        assert torch.allclose(reveal(p.grad), q.grad.double(), atol=1e-3)


@pytest.mark.parametrize("name,make,shape", CONVOLUTIONS, ids=[c[0] for c in CONVOLUTIONS])
def test_plaintext_fixed_point_convolutions_and_their_gradients(name, make, shape):
    """The same on fixed point without sharing (the oracle's own path, whose overflow check
    once assumed a forward 2-D convolution for every kind)."""
    torch.manual_seed(5)
    conv = make()
    fixed = copy.deepcopy(conv).fix_precision()
    x = torch.randn(shape).requires_grad_()
    a = x.detach().fix_precision().requires_grad_()
    ref, got = conv(x), fixed(a)
    ref.sum().backward()
    got.sum().backward()
    assert torch.allclose(got.float_precision(), ref, atol=1e-3)
    assert torch.allclose(a.grad.float_precision(), x.grad, atol=1e-3)
    for p, q in zip(fixed.parameters(), conv.parameters(), strict=True):
        assert torch.allclose(p.grad.float_precision(), q.grad, atol=1e-3)


def _selects_like_torch(x: torch.Tensor, op) -> None:
    """``op`` (values, indices) on shared ``x``: the same values and indices as in plaintext,
    and the same gradient through the secret indices."""
    ref_x = x.clone().requires_grad_()
    ref_values, ref_indices = op(ref_x)
    a = sh(x).requires_grad_()
    values, indices = op(a)
    assert torch.allclose(reveal(values), ref_values.double(), atol=ULP)
    assert torch.equal(indices.get().float_precision(), ref_indices)
    g = torch.randn(ref_values.shape)
    ref_values.backward(g)
    values.backward(sh(g))
    assert torch.allclose(reveal(a.grad), ref_x.grad.double(), atol=2 * ULP)


@settings(max_examples=15, deadline=None)
@given(shaped_tensors(max_dims=3, max_side=5, bound=100.0), st.data())
def test_sort_topk_and_their_gradients(x, data):
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1))
    descending = data.draw(st.booleans())
    k = data.draw(st.integers(0, x.shape[dim]))
    x = x + torch.arange(x.numel()).reshape(x.shape) * 1e-3  # distinct: unique indices
    _selects_like_torch(x, lambda t: torch.sort(t, dim, descending=descending))
    _selects_like_torch(x, lambda t: torch.topk(t, k, dim, largest=descending))
    assert torch.equal(torch.argsort(sh(x), dim).get().float_precision(), torch.argsort(x, dim))


def test_sort_breaks_ties_by_position_like_a_stable_sort():
    x = torch.tensor([[2.0, 1.0, 2.0, 0.5, 1.0]])
    for descending in (False, True):
        values, indices = torch.sort(sh(x), descending=descending)
        ref = torch.sort(x, descending=descending, stable=True)
        assert torch.equal(reveal(values), ref.values.double())
        assert torch.equal(indices.get().float_precision(), ref.indices)
    with pytest.raises(ValueError, match="k=6"):
        torch.topk(sh(x), 6)


@settings(max_examples=12, deadline=None)
@given(shaped_tensors(max_dims=3, max_side=5, bound=100.0), st.data())
def test_median_kthvalue_and_their_gradients(x, data):
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1))
    k = data.draw(st.integers(1, x.shape[dim]))
    keepdim = data.draw(st.booleans())
    x = x + torch.arange(x.numel()).reshape(x.shape) * 1e-3  # distinct: unique indices
    _selects_like_torch(x, lambda t: torch.median(t, dim, keepdim=keepdim))
    _selects_like_torch(x, lambda t: torch.kthvalue(t, k, dim, keepdim=keepdim))
    assert torch.allclose(reveal(torch.median(sh(x))), torch.median(x).double(), atol=ULP)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 11), st.integers(0, 1000))
def test_ties_go_to_the_first_index_as_in_torch(n, seed):
    """max/min/argmax/argmin pick the first of equal values (torch's documented rule), and
    max pooling routes the gradient of a tied window to its first element, as torch does."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (3, n), generator=gen).float()
    s = sh(x)
    assert torch.equal(reveal(s.max(1)[1]).long(), x.max(1)[1])
    assert torch.equal(reveal(s.min(1)[1]).long(), x.min(1)[1])
    assert torch.equal(reveal(s.argmax(1)).long(), x.argmax(1))
    assert torch.equal(reveal(s.argmin(1)).long(), x.argmin(1))
    img = torch.randint(0, 2, (1, 1, 4, 4), generator=gen).float().requires_grad_()
    a = sh(img.detach()).requires_grad_()
    F.max_pool2d(img, 2).sum().backward()
    F.max_pool2d(a, 2).sum().backward()
    assert torch.equal(reveal(a.grad), img.grad.double())


def test_softmax_family_over_any_spread():
    """Differences below exp's domain (-384) count as -384, whose weight is 0: softmax,
    log_softmax and cross-entropy of logits spread over thousands stay right."""
    x = torch.tensor([[0.0, -500.0, -1000.0, 3.0], [1.0, 2.0, 3.0, 4.0], [900.0, -900.0, 0.0, 1.0]])
    a = sh(x)
    assert torch.allclose(reveal(torch.softmax(a, 1)), torch.softmax(x, 1).double(), atol=1e-3)
    assert torch.allclose(
        reveal(torch.log_softmax(a, 1)), torch.log_softmax(x, 1).double(), atol=1e-3
    )
    target = torch.tensor([0, 3, 1])
    assert torch.allclose(
        reveal(F.cross_entropy(a, target)), F.cross_entropy(x, target).double(), atol=1e-3
    )


def test_roots_reciprocals_and_logs_degrade_gracefully_below_their_domain():
    """Down to one ring unit, below [2^-14, 2^44): no overflow, errors of a few percent
    (worst of 200 shared runs: reciprocal 1.5%, rsqrt 2.0%, sqrt 2.3%, log 0.114)."""
    x = torch.tensor([2.0**-16, 2.0**-15, 3 * 2.0**-16])
    a = sh(x)
    assert torch.allclose(reveal(A.reciprocal(a, positive=True)), 1 / x.double(), rtol=2.5e-2)
    assert torch.allclose(reveal(A.rsqrt(a)), x.double().rsqrt(), rtol=3e-2)
    assert torch.allclose(reveal(A.sqrt(a)), x.double().sqrt(), rtol=3e-2)
    assert torch.allclose(reveal(A.log(a)), x.double().log(), atol=0.15)


@pytest.mark.parametrize("shared_value", [False, True])
def test_reductions_over_dim_0_of_a_scalar(shared_value):
    """torch lets a 0-d tensor reduce over dim 0 (or -1): the value itself, index 0, and a
    gradient of one. These crashed (an index error, a missing cache, a modulo by zero)."""
    x = torch.tensor(2.5)

    def enc(t):
        return sh(t) if shared_value else t.fix_precision()

    def dec(t):
        return reveal(t) if shared_value else t.float_precision().double()

    assert dec(enc(x).mean(0, keepdim=True)).item() == 2.5
    for op in (torch.median, torch.max, torch.min, lambda t, d: torch.kthvalue(t, 1, d)):
        a = enc(x).requires_grad_()
        value, index = op(a, 0)
        value.backward()
        assert dec(value).item() == 2.5 and dec(a.grad).item() == 1.0
        assert index.shape == ()
    assert torch.argmax(enc(x), 0).shape == ()
    assert dec(torch.sort(enc(x), 0)[0]).item() == 2.5
    for reduced in (torch.amax(enc(x), 0, True), torch.amin(enc(x), 0), torch.aminmax(enc(x))[1],
                    torch.logsumexp(enc(x), 0)):
        assert dec(reduced).item() == 2.5


@pytest.mark.parametrize(
    ("dims", "keepdim"), [((0, 2), False), ((1, 2), True), ((-1, 0, 1), False)]
)
def test_logsumexp_over_several_dims(dims, keepdim):
    x = torch.randn(2, 3, 4) * 3
    got = torch.logsumexp(sh(x), dims, keepdim)
    assert torch.allclose(reveal(got), torch.logsumexp(x, dims, keepdim).double(), atol=3e-3)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.booleans(), st.data())
def test_adaptive_max_pooling_of_any_sizes_and_its_gradient(d, batched, data):
    """Windows of unequal sizes (5 -> 3 covers [0, 2), [1, 4), [3, 5)), 1-D to 3-D, batched
    or not, with ties: values, and gradients routed where torch routes them."""
    spatial = tuple(data.draw(st.lists(st.integers(1, 7), min_size=d, max_size=d)))
    size = tuple(data.draw(st.integers(1, n)) for n in spatial)
    pool = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[d - 1]
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    x = torch.randint(-3, 4, ((2, 3) if batched else (3,)) + spatial).float()  # many ties
    x.requires_grad_()
    a = sh(x.detach()).requires_grad_()
    ref, got = pool(x, size), pool(a, size)
    assert got.shape == ref.shape
    assert torch.equal(reveal(got), ref.double())
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=2 * ULP)


def test_adaptive_max_pooling_rejects_bad_sizes():
    with pytest.raises(ValueError, match="output size"):
        F.adaptive_max_pool2d(sh(torch.randn(1, 1, 5, 5)), (0, 2))
