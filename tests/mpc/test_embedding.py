"""Reads and writes at public indices against plaintext: ``nn.EmbeddingBag`` on shared
tables (and shared per-sample weights), and graph-network aggregation (``index_add``,
``scatter_add``), forward and backward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.mpc.helpers import local_parties, reveal, shared, tensors

PARTIES, PROVIDER = local_parties(2)
TOL = 1e-3


def sh(x: torch.Tensor):
    return shared(x, PARTIES, PROVIDER)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 8), st.integers(1, 4), st.lists(st.integers(0, 4), min_size=1, max_size=4),
    st.sampled_from(["sum", "mean", "max"]), st.booleans(), st.booleans(),
    st.sampled_from(["none", "public", "shared"]), st.data(),
)
def test_embedding_bag_and_its_gradients_match_plaintext(
    vocab, dim, lengths, mode, padded, last_offset, weights, data
):
    if weights != "none" and mode != "sum":
        weights = "none"  # torch: per-sample weights only with mode="sum"
    n = sum(lengths)
    if n == 0:
        lengths, n = [1], 1
    indices = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n)))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    if last_offset:
        offsets = torch.cat([offsets, torch.tensor([n])])
    padding_idx = data.draw(st.integers(0, vocab - 1)) if padded else None
    torch.manual_seed(data.draw(st.integers(0, 100)))
    bag = nn.EmbeddingBag(vocab, dim, mode=mode, include_last_offset=last_offset,
                          padding_idx=padding_idx)
    secure = copy.deepcopy(bag).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    psw = data.draw(tensors((n,), 2.0)) if weights != "none" else None
    plain_psw = psw.clone().requires_grad_() if psw is not None else None
    secure_psw = sh(psw).requires_grad_() if weights == "shared" else psw
    ref = bag(indices, offsets, per_sample_weights=plain_psw)
    got = secure(indices, offsets, per_sample_weights=secure_psw)
    grad = data.draw(tensors(tuple(ref.shape), 2.0))
    ref.backward(grad)
    got.backward(sh(grad))
    assert torch.allclose(reveal(got), ref.detach().double(), atol=TOL)
    assert torch.allclose(reveal(secure.weight.grad), bag.weight.grad.double(), atol=TOL)
    if weights == "shared":
        assert torch.allclose(reveal(secure_psw.grad), plain_psw.grad.double(), atol=TOL)


def test_secret_indices_are_refused():
    indices, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
    with pytest.raises(NotImplementedError, match="secret indices"):
        torch.ops.aten._embedding_bag(
            torch.ones(5, 2).fix_precision(), indices.fix_precision(), offsets
        )


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(1, 3), st.data())
def test_message_passing_with_public_indices_matches_plaintext(nodes, edges, dim, data):
    """index_add / scatter_add (and their in-place forms) at public indices, the
    aggregation of graph networks: local, gradients included."""
    target = torch.tensor(data.draw(st.lists(st.integers(0, nodes - 1), min_size=edges,
                                             max_size=edges)))
    x = data.draw(tensors((nodes, dim), 4.0))
    messages = data.draw(tensors((edges, dim), 4.0))
    alpha = data.draw(st.sampled_from([1, 0.5, -2]))
    plain_m = messages.clone().requires_grad_()
    secure_m = sh(messages).requires_grad_()
    ref = x.index_add(0, target, plain_m, alpha=alpha)
    got = sh(x).index_add(0, target, secure_m, alpha=alpha)
    assert torch.allclose(reveal(got), ref.detach().double(), atol=TOL)
    (ref * ref).sum().backward()
    (got * got).sum().backward()
    assert torch.allclose(reveal(secure_m.grad), plain_m.grad.double(), atol=1e-2)
    index = target[:, None].expand(edges, dim)
    expected = x.scatter_add(0, index, messages).double()
    assert torch.allclose(reveal(sh(x).scatter_add(0, index, sh(messages))), expected, atol=TOL)
    inplace = sh(x)
    inplace.index_add_(0, target, messages)
    assert torch.allclose(reveal(inplace), x.index_add(0, target, messages).double(), atol=TOL)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.sampled_from(["sum", "mean", "amax", "amin"]),
       st.booleans(), st.data())
def test_scatter_reduce_and_scatter_at_public_indices(nodes, edges, reduce, include_self, data):
    """scatter_reduce with "sum", "mean" (local, the counts public), "amax" or "amin" (a
    tournament over ragged groups; ties, frequent here, share the gradient as in torch),
    include_self either way, and scatter of tensors or numbers, gradients included."""
    target = torch.tensor(data.draw(st.lists(st.integers(0, nodes - 1), min_size=edges,
                                             max_size=edges)))[:, None].expand(edges, 2)
    x, src = data.draw(tensors((nodes, 2), 4.0)), data.draw(tensors((edges, 2), 4.0))
    if reduce in ("amax", "amin"):  # few distinct values: ties
        x, src = (x * 4).round() / 4, (src * 4).round() / 4
    px, ps = x.clone().requires_grad_(), src.clone().requires_grad_()
    sx, ss = sh(x).requires_grad_(), sh(src).requires_grad_()
    ref = px.scatter_reduce(0, target, ps, reduce, include_self=include_self)
    got = sx.scatter_reduce(0, target, ss, reduce, include_self=include_self)
    assert torch.allclose(reveal(got), ref.detach().double(), atol=TOL)
    grad = data.draw(tensors((nodes, 2), 2.0))
    ref.backward(grad)
    got.backward(sh(grad))
    assert torch.allclose(reveal(sx.grad), px.grad.double(), atol=TOL)
    assert torch.allclose(reveal(ss.grad), ps.grad.double(), atol=TOL)
    first = target[:1]  # one position per column: scatter's overwrite is well defined
    assert torch.allclose(reveal(sh(x).scatter(0, first, sh(src[:1]))),
                          x.scatter(0, first, src[:1]).double(), atol=TOL)
    assert torch.allclose(reveal(sh(x).scatter(0, first, -1.5)),
                          x.scatter(0, first, -1.5).double(), atol=TOL)
    with pytest.raises(NotImplementedError, match="prod"):
        sh(x).scatter_reduce(0, target, ss, "prod")


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.sampled_from(["amax", "amin"]), st.booleans(), st.data())
def test_scatter_reduce_extremes_along_any_dim(nd, reduce, include_self, data):
    """amax/amin along any dimension, with an index smaller than src and than x in the other
    dimensions (torch then reads and writes only over the index's extent)."""
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    dim = data.draw(st.integers(0, nd - 1))
    ishape = tuple(data.draw(st.integers(1, 5 if d == dim else s)) for d, s in enumerate(shape))
    sshape = tuple(i + data.draw(st.integers(0, 1)) for i in ishape)
    index = torch.tensor(data.draw(st.lists(st.integers(0, shape[dim] - 1),
                                            min_size=math.prod(ishape),
                                            max_size=math.prod(ishape)))).reshape(ishape)
    x, src = data.draw(tensors(shape, 4.0)), data.draw(tensors(sshape, 4.0))
    ref = x.scatter_reduce(dim, index, src, reduce, include_self=include_self)
    got = sh(x).scatter_reduce(dim, index, sh(src), reduce, include_self=include_self)
    assert torch.equal(reveal(got), ref.double())
    public = sh(x).scatter_reduce(dim, index, src, reduce, include_self=include_self)
    assert torch.equal(reveal(public), ref.double())
    with pytest.raises(IndexError, match="index"):
        sh(x).scatter_reduce(dim, index + shape[dim], sh(src), reduce)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.sampled_from([1.0, 2.0]),
       st.booleans(), st.data())
def test_cdist_and_its_gradients_match_plaintext(n, m, d, p, batched, data):
    """Pairwise distances (p = 2 and p = 1), batched or not, against plaintext; one pair of
    equal points checks torch's zero gradient there. Points lie on a grid of 1/4: below
    about 0.05 a distance has too few bits at 16 fractional bits for its gradient ``1/d``."""
    lead = (2,) if batched else ()

    def grid(shape):
        size = 1
        for s in shape:
            size *= s
        values = data.draw(st.lists(st.integers(-12, 12), min_size=size, max_size=size))
        return torch.tensor(values, dtype=torch.float32).reshape(shape) / 4

    x, y = grid((*lead, n, d)), grid((*lead, m, d))
    y[..., 0, :] = x[..., 0, :]  # a distance of exactly 0
    px, py = x.clone().requires_grad_(), y.clone().requires_grad_()
    sx, sy = sh(x).requires_grad_(), sh(y).requires_grad_()
    ref, got = torch.cdist(px, py, p=p), torch.cdist(sx, sy, p=p)
    # the square root near 0 sees the squared distance's rounding: sqrt(3 units) ~ 7e-3
    assert torch.allclose(reveal(got), ref.detach().double(), atol=1e-2 if p == 2 else TOL)
    grad = data.draw(tensors(tuple(ref.shape), 2.0))
    ref.backward(grad)
    got.backward(sh(grad))
    assert torch.allclose(reveal(sx.grad), px.grad.double(), atol=1e-2)
    assert torch.allclose(reveal(sy.grad), py.grad.double(), atol=1e-2)


def test_cdist_other_norms_are_refused():
    with pytest.raises(NotImplementedError, match="only 1 and 2"):
        torch.cdist(sh(torch.ones(2, 2)), sh(torch.ones(3, 2)), p=3)
