"""Linear operations on fixed-precision tensors, public and shared, against plaintext."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import veil
import veil.mpc
from tests.mpc.helpers import (
    ULP,
    local_parties,
    reveal,
    shaped_tensors,
    shared,
    tensors,
    train_mse,
    worker_parties,
)
from veil.mpc import FixedPrecisionTensor

PARTIES, PROVIDER = local_parties(2)
WORKERS = worker_parties(2)


def both(x: torch.Tensor):
    """The same values as a public fixed-point tensor and a shared one."""
    return [x.fix_precision(), shared(x, PARTIES, PROVIDER)]


def value(t) -> torch.Tensor:
    return (t.get() if t.is_shared else t).float_precision().double()


@settings(max_examples=25)
@given(shaped_tensors(), st.floats(-50, 50))
def test_add_sub_neg_and_public_operands(x, c):
    y = torch.flip(x, [0])
    for a, b in zip(both(x), both(y)):
        assert torch.allclose(value(a + b), (x + y).double(), atol=0)
        assert torch.allclose(value(a - b), (x - y).double(), atol=0)
        assert torch.allclose(value(-a), -x.double(), atol=0)
        assert torch.allclose(value(a + y), (x + y).double(), atol=0)
        assert torch.allclose(value(y - a), (y - x).double(), atol=0)
        assert torch.allclose(value(a + c), x.double() + c, atol=ULP)
        assert torch.allclose(value(c - a), c - x.double(), atol=ULP)


@settings(max_examples=20)
@given(shaped_tensors(bound=30.0))
def test_mul_square_pow(x):
    y = torch.roll(x, 1, 0)
    ref = x.double() * y.double()
    for a, b in zip(both(x), both(y)):
        assert torch.allclose(value(a * b), ref, atol=2 * ULP)
        assert torch.allclose(value(a * y), ref, atol=2 * ULP)
        assert torch.allclose(value(a * 3), 3 * x.double(), atol=0)
        assert torch.allclose(value(a.square()), x.double() ** 2, atol=2 * ULP)
        assert torch.allclose(value(a * a), x.double() ** 2, atol=2 * ULP)
    small = x / 8
    for a in both(small):
        assert torch.allclose(value(a**3), small.double() ** 3, atol=8 * ULP, rtol=1e-4)
        assert torch.allclose(value(a**0), torch.ones_like(small.double()))


@settings(max_examples=20)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 5), st.data())
def test_matmul_mm_addmm(m, k, n, data):
    x = data.draw(tensors((m, k), 20.0))
    w = data.draw(tensors((k, n), 20.0))
    b = data.draw(tensors((n,), 20.0))
    ref = x.double() @ w.double()
    tol = (k + 2) * ULP
    for a, ww, bb in zip(both(x), both(w), both(b)):
        assert torch.allclose(value(a @ ww), ref, atol=tol)
        assert torch.allclose(value(torch.mm(a, ww)), ref, atol=tol)
        assert torch.allclose(value(torch.addmm(bb, a, ww)), ref + b.double(), atol=tol)
        assert torch.allclose(value(a @ w), ref, atol=tol)
        assert torch.allclose(value(ww.t() @ a.t()), ref.t(), atol=tol)


#: ``torch.matmul`` shape pairs that its decomposition routes through in-place squeezes
#: (vector @ matrix) or through views of expanded operands (batch broadcasting).
MATMUL_SHAPES = [
    ((4,), (4, 3)),
    ((3, 4), (4,)),
    ((4,), (4,)),
    ((2, 3, 4), (4,)),
    ((4,), (2, 4, 3)),
    ((1, 4), (2, 4, 3)),
    ((2, 5, 4), (1, 4, 3)),
    ((3, 2, 5, 4), (2, 4, 3)),
    ((2, 1, 5, 4), (3, 4, 2)),
]


@settings(max_examples=20)
@given(st.sampled_from(MATMUL_SHAPES), st.data())
def test_matmul_vectors_and_broadcast_batches(shapes, data):
    x = data.draw(tensors(shapes[0], 10.0))
    w = data.draw(tensors(shapes[1], 10.0))
    ref = x.double() @ w.double()
    tol = (shapes[0][-1] + 2) * ULP
    for a, ww in zip(both(x), both(w)):
        out = a @ ww
        assert out.shape == ref.shape
        assert torch.allclose(value(out), ref, atol=tol)
        assert torch.allclose(value(a @ w), ref, atol=tol)
        assert torch.allclose(value(torch.matmul(x, ww)), ref, atol=tol)


def test_vector_matrix_gradients_match_plaintext():
    x = torch.tensor([0.5, -1.0, 2.0])
    w = torch.tensor([[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75]])
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr).sum().backward()
    for a, ww in zip(both(x), both(w)):
        a.requires_grad_()
        ww.requires_grad_()
        (a @ ww).sum().backward()
        assert torch.allclose(value(a.grad), xr.grad.double(), atol=4 * ULP)
        assert torch.allclose(value(ww.grad), wr.grad.double(), atol=4 * ULP)


def test_in_place_squeeze_and_unsqueeze_reshape_the_wrapper():
    x = torch.tensor([[1.5, -2.0, 3.25]])
    for a in both(x):
        assert a.squeeze_(0).shape == (3,)
        assert a.unsqueeze_(1).shape == (3, 1)
        assert a.t_().shape == (1, 3)
        assert a.transpose_(0, 1).shape == (3, 1)
        assert torch.equal(value(a), x.double().t())
    y = veil.mpc.share(torch.arange(6).view(1, 2, 3), *PARTIES, crypto_provider=PROVIDER)
    y.squeeze_(0)
    assert y.shape == (2, 3)
    assert torch.equal(y.get(), torch.arange(6).view(2, 3))


@settings(max_examples=20)
@given(shaped_tensors(bound=1000.0), st.data())
def test_sum_mean_over_dims(x, data):
    dim = data.draw(st.integers(0, x.dim() - 1))
    keep = data.draw(st.booleans())
    for a in both(x):
        assert torch.allclose(value(a.sum()), x.double().sum(), atol=0)
        assert torch.allclose(value(a.sum(dim, keepdim=keep)), x.double().sum(dim, keepdim=keep))
        mean = x.double().mean(dim, keepdim=keep)
        assert torch.allclose(value(a.mean(dim, keepdim=keep)), mean, atol=2 * ULP, rtol=1e-6)
        assert torch.allclose(value(a.mean()), x.double().mean(), atol=2 * ULP, rtol=1e-6)


@settings(max_examples=20)
@given(shaped_tensors(bound=1000.0), st.floats(0.01, 100) | st.integers(1, 1000))
def test_division_by_public_scalar(x, d):
    for a in both(x):
        got = value(a / d)
        exact = x.double() / d
        assert torch.allclose(got, exact, atol=2 * ULP, rtol=2**-22)


@settings(max_examples=20)
@given(st.integers(2, 4), st.integers(1, 4), st.data())
def test_views_and_indexing(m, n, data):
    x = data.draw(tensors((m, n)))
    d = x.double()
    for a in both(x):
        assert torch.equal(value(a.t()), d.t())
        assert torch.equal(value(a.transpose(0, 1)), d.transpose(0, 1))
        assert torch.equal(value(a.view(-1)), d.view(-1))
        assert torch.equal(value(a.reshape(n, m)), d.reshape(n, m))
        assert torch.equal(value(a.unsqueeze(0).expand(3, m, n)), d.unsqueeze(0).expand(3, m, n))
        assert torch.equal(value(a[1]), d[1])
        assert torch.equal(value(a[:, -1]), d[:, -1])
        assert torch.equal(value(a[1:, ::2]), d[1:, ::2])
        assert torch.equal(value(a[torch.tensor([0, m - 1])]), d[torch.tensor([0, m - 1])])
        assert torch.equal(value(torch.cat([a, a], 1)), torch.cat([d, d], 1))
        assert torch.equal(value(torch.stack([a, a])), torch.stack([d, d]))
        assert torch.equal(value(torch.cat([a, x], 0)), torch.cat([d, d], 0))
        assert torch.equal(value(a.permute(1, 0)), d.permute(1, 0))
        assert torch.equal(value(a.flip(0)), d.flip(0))
        parts = a.split(1, 0)
        assert torch.equal(value(parts[-1]), d[-1:])


def test_in_place_ops_update_the_wrapper():
    for a in both(torch.tensor([1.0, 2.0])):
        a.add_(torch.tensor([1.0, 1.0]).fix_precision())
        a.mul_(2)
        a.sub_(1.0)
        assert value(a).tolist() == [3.0, 5.0]
        a.add_(a, alpha=-0.5)
        assert torch.allclose(value(a), torch.tensor([1.5, 2.5], dtype=torch.float64), atol=ULP)


def test_shared_over_workers_matches_local():
    x = torch.tensor([[1.5, -2.25], [0.125, 4.0]])
    parties, provider = WORKERS
    a = shared(x, parties, provider)
    got = reveal((a @ a.t() + a * 2.0 - a.sum(0)) / 3)
    ref = (x @ x.t() + x * 2.0 - x.sum(0)) / 3
    assert torch.allclose(got, ref.double(), atol=1e-4)


@pytest.mark.parametrize("n", [3, 5])
def test_more_parties(n):
    parties, provider = local_parties(n)
    x = torch.tensor([[1.5, -2.25], [0.125, 4.0]])
    a = shared(x, parties, provider)
    assert torch.allclose(reveal(a @ a * 0.5), (x @ x * 0.5).double(), atol=1e-4)


@pytest.mark.parametrize("n,serialize", [(3, False), (3, True), (5, False)])
def test_more_parties_over_workers(n, serialize):
    """Products, truncations, comparisons and a training step with every share on its own
    worker: with three or more parties, openings go through party 0's relay, so party 0
    receives n - 1 messages and the others one."""
    parties, provider = worker_parties(n, serialize=serialize)
    torch.manual_seed(n)
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    a, b = shared(x, parties, provider), shared(w, parties, provider)
    xd, wd = x.double(), w.double()
    assert torch.allclose(reveal(a * a), xd * xd, atol=4 * ULP)
    assert torch.allclose(reveal(a @ b), xd @ wd, atol=8 * ULP)
    assert torch.allclose(reveal(a * 2.5 - a / 4), xd * 2.25, atol=4 * ULP)
    assert torch.allclose(reveal(torch.relu(a)), torch.relu(xd), atol=ULP)
    assert torch.allclose(reveal(a.max(1).values), xd.max(1).values, atol=ULP)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    plain = copy.deepcopy(model)
    secure = model.fix_precision().share(*parties, crypto_provider=provider)
    y = torch.randn(4, 1)
    for net, inputs, target in ((plain, x, y), (secure, a, shared(y, parties, provider))):
        train_mse(net, inputs, target, steps=2, lr=0.1)
    for p, q in zip(secure.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(reveal(p), q.detach().double(), atol=1e-3)


def test_plain_overflow_is_detected():
    big = torch.tensor([2.0**20]).fix_precision()
    with pytest.raises(veil.PrecisionOverflow):
        big * big


def test_float_precision_requires_get_and_errors():
    s = shared(torch.tensor([1.0]), PARTIES, PROVIDER)
    with pytest.raises(veil.ProtocolError, match="get"):
        s.float_precision()
    with pytest.raises(veil.ProtocolError):
        torch.tensor([1.0]).float_precision()
    with pytest.raises(veil.ProtocolError):
        s.fix_precision()
    assert isinstance(s, FixedPrecisionTensor) and s.dtype == torch.float32


def test_unsupported_op_names_itself():
    a = torch.tensor([1.0, 2.0]).fix_precision()
    with pytest.raises(NotImplementedError, match=r"aten\.sin"):
        torch.sin(a)
    s = torch.tensor([1, 2]).share("a", "b", crypto_provider="c")
    with pytest.raises(NotImplementedError, match="AdditiveSharingTensor"):
        torch.cumsum(s, 0)


def test_integer_shares_arithmetic():
    x = torch.tensor([[3, -4], [5, 6]])
    s = x.share("a", "b", crypto_provider="c")
    assert torch.equal((s * s + 1 - s).get(), x * x + 1 - x)
    assert torch.equal((s @ s).get(), x @ x)
    assert torch.equal((s**3).get(), x**3)
    assert torch.equal(s.sum().get(), x.sum())
    assert torch.equal((s > 0).get(), (x > 0).long())
    assert torch.equal(torch.relu(s).get(), torch.relu(x))


def test_empty_tensors_go_through_every_protocol():
    """Zero-size values need no protocol (an empty product is zeros): nothing is dealt or
    opened, and a later operation still works."""
    e, w = torch.zeros(0, 3), torch.randn(3, 2)
    k0a, k0b = torch.zeros(3, 0), torch.zeros(0, 2)
    for a in both(e):
        assert value(a @ both(w)[1]).shape == (0, 2)
        assert value(a * 2.5).shape == (0, 3)
        assert value(a @ w).shape == (0, 2)
        assert value(torch.relu(a)).shape == (0, 3)
        assert (a > 0).get().float_precision().shape == (0, 3)
        assert value(torch.sigmoid(a)).shape == (0, 3)
        assert value(a.sum()).item() == 0
    for a, b in zip(both(k0a), both(k0b)):
        assert torch.equal(value(a @ b), torch.zeros(3, 2, dtype=torch.float64))
    x = shared(torch.tensor([1.5, -2.0]), PARTIES, PROVIDER)
    assert torch.equal(reveal(torch.relu(x * x)), torch.tensor([2.25, 4.0], dtype=torch.float64))


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(1, 2),
    st.integers(1, 2), st.data(),
)
def test_unfold_and_fold_match_torch(kh, kw, pad, dil, stride, data):
    from veil.mpc.sharing import col2im, im2col

    h = data.draw(st.integers(dil * (kh - 1) + 1, 7))
    w = data.draw(st.integers(dil * (kw - 1) + 1, 7))
    x = torch.randint(-1000, 1000, (2, 2, h, w))
    args = ([kh, kw], [dil, dil], [pad, pad], [stride, stride])
    kw_ = {"kernel_size": (kh, kw), "dilation": dil, "padding": pad, "stride": stride}
    cols = F.unfold(x.double(), **kw_)
    assert torch.equal(im2col(x, *args), cols.long())  # torch's kernels are float-only
    assert torch.equal(col2im(cols.long(), [h, w], *args), F.fold(cols, (h, w), **kw_).long())
    real = x.float() / 64
    for a in both(real):
        a.requires_grad_()
        got = F.unfold(a, **kw_)
        assert torch.allclose(value(got), F.unfold(real.double(), **kw_), atol=0)
        got.sum().backward()
        ref = real.clone().requires_grad_()
        F.unfold(ref, **kw_).sum().backward()
        assert torch.allclose(value(a.grad), ref.grad.double(), atol=0)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_elementwise_products_of_transposed_matrices(m, n, data):
    """``x.t()`` of a shared matrix is transposed lazily (its parties transpose inside the
    next matrix product); an elementwise product or a convolution of it used the shares in
    their stored layout, so ``x.t() * y`` was wrong (and mis-shaped when not square)."""
    x = data.draw(tensors((m, n), 5.0))
    y = data.draw(tensors((n, m), 5.0))
    c = data.draw(tensors((), 5.0))
    w = data.draw(tensors((1, 1, 1, 1), 2.0))
    sx, sy = shared(x, PARTIES, PROVIDER), shared(y, PARTIES, PROVIDER)
    assert torch.allclose(reveal(sx.t() * sy), (x.t() * y).double(), atol=1e-3)
    assert torch.allclose(reveal(sx.t() * y), (x.t() * y).double(), atol=1e-3)
    st_c = shared(c, PARTIES, PROVIDER)
    assert torch.allclose(reveal(sx.t() * st_c), (x.t() * c).double(), atol=1e-3)
    conv = F.conv2d(sx.t()[None, None], shared(w, PARTIES, PROVIDER))
    assert torch.allclose(reveal(conv), F.conv2d(x.t()[None, None], w).double(), atol=1e-3)
