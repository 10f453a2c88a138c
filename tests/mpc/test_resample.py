"""Upsampling (``F.interpolate``, every mode), adaptive average pooling and replication
padding on shared values, forward and backward, against torch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.mpc.helpers import ULP, local_parties, reveal, shared

PARTIES, PROVIDER = local_parties(2)

#: Modes per number of spatial dimensions, with whether they take align_corners/antialias.
_MODES = {
    1: ["nearest", "nearest-exact", "linear"],
    2: ["nearest", "nearest-exact", "bilinear", "bicubic"],
    3: ["nearest", "nearest-exact", "trilinear"],
}


def sh(x: torch.Tensor):
    return shared(x, PARTIES, PROVIDER)


def _check(fn, x: torch.Tensor, tol: float, grad_tol: float, expected_grad=None) -> None:
    """``fn`` on a shared copy of ``x`` against torch: shape, values, and the gradient for a
    random output gradient (torch's, or ``expected_grad(g)`` when given)."""
    x = x.clone().requires_grad_()
    ref = fn(x)
    a = sh(x.detach()).requires_grad_()
    got = fn(a)
    assert got.shape == ref.shape
    assert torch.allclose(reveal(got), ref.double(), atol=tol)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    expected = expected_grad(g) if expected_grad else x.grad.double()
    assert torch.allclose(reveal(a.grad), expected, atol=grad_tol)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.data())
def test_interpolate_and_its_gradient_match_torch(d, data):
    mode = data.draw(st.sampled_from(_MODES[d]))
    spatial = tuple(data.draw(st.lists(st.integers(2, 5), min_size=d, max_size=d)))
    kw: dict = {}
    if data.draw(st.booleans()):
        kw["size"] = tuple(data.draw(st.lists(st.integers(1, 7), min_size=d, max_size=d)))
    else:
        kw["scale_factor"] = data.draw(st.sampled_from([0.5, 1.5, 2.0, 3.0]))
    if mode in ("linear", "bilinear", "bicubic", "trilinear"):
        kw["align_corners"] = data.draw(st.booleans())
    if mode in ("bilinear", "bicubic") and data.draw(st.booleans()):
        kw["antialias"] = True
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    exact = mode.startswith("nearest")
    # weights encoded at 16 bits: 2^-17 per weight times |x| <= 16, a few taps, one rounding
    # per axis
    tol = 2 * d * ULP if exact else 1e-3
    adjoint = (lambda g: _adjoint(mode, kw, spatial, g)) if kw.get("antialias") else None
    _check(lambda t: F.interpolate(t, mode=mode, **kw), torch.randn(2, 2, *spatial) * 4, tol,
           tol if exact else 2e-3, adjoint)


def _adjoint(mode: str, kw: dict, spatial: tuple[int, ...], g: torch.Tensor) -> torch.Tensor:
    """The exact gradient of torch's forward: its Jacobian (the forward of every unit input,
    in float64) transposed, times ``g``. torch's own antialiased backward is not its
    forward's adjoint on inputs of a few pixels (a 4x2 -> 2x1 bilinear, for one)."""
    n = torch.Size(spatial).numel()
    basis = torch.eye(n, dtype=torch.float64).view(n, 1, *spatial)
    jac = F.interpolate(basis, mode=mode, **kw).reshape(n, -1)  # inputs x outputs
    flat = g.double().reshape(*g.shape[:2], -1)
    return (flat @ jac.t()).reshape(*g.shape[:2], *spatial)


def test_a_decoder_with_upsampling_trains_like_plaintext():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Upsample(scale_factor=2,
                          mode="bilinear"), nn.ReLU(), nn.Conv2d(3, 1, 3, padding=1))
    secure = copy.deepcopy(model).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    x, y = torch.randn(2, 2, 4, 4), torch.randn(2, 1, 8, 8)
    plain_loss = F.mse_loss(model(x), y)
    plain_loss.backward()
    loss = F.mse_loss(secure(sh(x)), sh(y))
    loss.backward()
    assert abs(float(reveal(loss)) - float(plain_loss.detach())) < 1e-3
    for p, q in zip(secure.parameters(), model.parameters(), strict=True):
        assert torch.allclose(reveal(p.grad), q.grad.double(), atol=2e-3)


def test_upsampling_public_fixed_point_values():
    x = torch.randn(1, 1, 3, 3)
    got = F.interpolate(x.fix_precision(), scale_factor=2, mode="bilinear").float_precision()
    assert torch.allclose(got, F.interpolate(x, scale_factor=2, mode="bilinear"), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.booleans(), st.data())
def test_adaptive_avg_pooling_of_any_size_and_its_gradient(d, batched, data):
    """Windows of unequal sizes (7 -> 3), 1-D to 3-D, batched or not."""
    spatial = tuple(data.draw(st.lists(st.integers(1, 7), min_size=d, max_size=d)))
    size = tuple(data.draw(st.integers(1, n + 2)) for n in spatial)
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[d - 1]
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    x = torch.randn(*((2, 3) if batched else (3,)), *spatial) * 4
    _check(lambda t: pool(t, size), x, 1e-3, 2e-3)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.data())
def test_replication_padding_and_its_gradient(d, data):
    """Replication padding (cropping where a pad is negative), exact, gradient included."""
    spatial = tuple(data.draw(st.lists(st.integers(3, 5), min_size=d, max_size=d)))
    pads = data.draw(st.lists(st.integers(-1, 3), min_size=2 * d, max_size=2 * d))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    _check(lambda t: F.pad(t, pads, mode="replicate"), torch.randn(2, 2, *spatial) * 4, ULP,
           d * 2 * ULP)


def test_the_weights_of_a_large_image_come_from_a_small_basis():
    """A 300x400 image: the basis torch's kernel runs on holds n_j one-hot rows of one or two
    places along the other axes, not n_j copies of the image (which would be 0.4 GB)."""
    x = torch.randn(1, 1, 300, 400)
    got = F.interpolate(x.fix_precision(), size=(150, 500), mode="bilinear", antialias=True)
    ref = F.interpolate(x, size=(150, 500), mode="bilinear", antialias=True)
    assert torch.allclose(got.float_precision(), ref, atol=1e-3)
