"""lerp, addbmm, addr, nn.Bilinear, masked_select, masked_scatter and index_reduce on shared
values, forward and backward, against torch."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.mpc.helpers import local_parties, reveal, shared, tensors

PARTIES, PROVIDER = local_parties(2)
TOL = 2e-4


def sh(x: torch.Tensor):
    return shared(x, PARTIES, PROVIDER)


def _check(fn, *inputs: torch.Tensor, share=None, tol: float = TOL) -> None:
    """``fn`` on shared copies of ``inputs`` (those ``share`` marks; all by default) against
    torch, values and gradients of every shared input."""
    share = share or [True] * len(inputs)
    plain = [t.clone().requires_grad_() for t in inputs]
    secure = [sh(t).requires_grad_() if s else t for t, s in zip(inputs, share, strict=True)]
    ref, got = fn(*plain), fn(*secure)
    assert torch.allclose(reveal(got), ref.detach().double(), atol=tol)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    for s, p, is_shared in zip(secure, plain, share, strict=True):
        if is_shared:
            assert torch.allclose(reveal(s.grad), p.grad.double(), atol=10 * tol)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([0.0, 0.3, 1.0, "tensor"]),
       st.data())
def test_lerp_and_its_in_place_form(n, m, weight, data):
    x, e = data.draw(tensors((n, m), 4.0)), data.draw(tensors((n, m), 4.0))
    if weight == "tensor":
        w = data.draw(tensors((n, m), 1.0))
        _check(torch.lerp, x, e, w)
    else:
        _check(lambda a, b: torch.lerp(a, b, weight), x, e)
    ema = sh(x)
    ema.lerp_(sh(e), 0.1)  # an exponential moving average step
    assert torch.allclose(reveal(ema), x.lerp(e, 0.1).double(), atol=TOL)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([(1, 1), (0.5, 2.0), (0, 1)]), st.data())
def test_addbmm_and_addr(batch, n, k, m, coefs, data):
    beta, alpha = coefs
    base = data.draw(tensors((n, m), 4.0))
    b1, b2 = data.draw(tensors((batch, n, k), 2.0)), data.draw(tensors((batch, k, m), 2.0))
    _check(lambda c, x, y: torch.addbmm(c, x, y, beta=beta, alpha=alpha), base, b1, b2,
           tol=1e-3)
    v1, v2 = data.draw(tensors((n,), 2.0)), data.draw(tensors((m,), 2.0))
    _check(lambda c, x, y: torch.addr(c, x, y, beta=beta, alpha=alpha), base, v1, v2,
           share=[True, True, False], tol=1e-3)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_masked_select_at_a_public_mask(n, m, data):
    x = data.draw(tensors((n, m), 4.0))
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=m, max_size=m)))
    _check(lambda a: torch.masked_select(a, mask), x)  # the mask broadcasts over rows
    source = data.draw(tensors((n * m + 1,), 4.0))
    _check(lambda a, b: a.masked_scatter(mask, b), x, source)
    inplace = sh(x)
    inplace.masked_scatter_(mask, sh(source))
    assert torch.allclose(reveal(inplace), x.masked_scatter(mask, source).double(), atol=TOL)
    with pytest.raises(NotImplementedError, match="secret mask"):
        torch.masked_select(sh(x), sh(x) > 0)


@pytest.mark.filterwarnings("ignore:index_reduce")  # torch: "in beta"
@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from(["mean", "amax", "amin"]),
       st.booleans(), st.data())
def test_index_reduce_at_public_indices(n, k, reduce, include_self, data):
    x, src = data.draw(tensors((3, n), 4.0)), data.draw(tensors((3, k), 4.0))
    index = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k)))
    ref = x.index_reduce(1, index, src, reduce, include_self=include_self)
    got = sh(x).index_reduce(1, index, sh(src), reduce, include_self=include_self)
    assert torch.allclose(reveal(got), ref.double(), atol=TOL)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.data())
def test_bilinear_layer_and_its_gradients(n, d1, d2, out, data):
    """``nn.Bilinear`` runs as ``_trilinear`` forward and backward (weights shared too)."""
    torch.manual_seed(data.draw(st.integers(0, 100)))
    layer = nn.Bilinear(d1, d2, out)
    secure = copy.deepcopy(layer).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    x1, x2 = data.draw(tensors((n, d1), 2.0)), data.draw(tensors((n, d2), 2.0))
    p1, p2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    s1, s2 = sh(x1).requires_grad_(), sh(x2).requires_grad_()
    ref, got = layer(p1, p2), secure(s1, s2)
    assert torch.allclose(reveal(got), ref.detach().double(), atol=1e-3)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    for s, p in ((s1, p1), (s2, p2), (secure.weight, layer.weight), (secure.bias, layer.bias)):
        assert torch.allclose(reveal(s.grad), p.grad.double(), atol=2e-3)
