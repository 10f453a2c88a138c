"""Ops that run as torch's decompositions, variance and friends, and logical operations on
comparison results: all against plaintext."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import veil
from tests.mpc.helpers import (
    ULP,
    local_parties,
    reveal,
    shaped_tensors,
    shared,
    tensors,
    worker_parties,
)
from veil.mpc._registry import Registry

PARTIES, PROVIDER = local_parties(2)


def sh(x: torch.Tensor):
    return shared(x, PARTIES, PROVIDER)


@settings(max_examples=25)
@given(shaped_tensors(bound=10.0), st.data())
def test_variance_over_dims_against_plaintext(x, data):
    dim = data.draw(st.none() | st.integers(0, x.dim() - 1))
    correction = data.draw(st.sampled_from([0, 1]))
    keepdim = data.draw(st.booleans())
    count = x.numel() if dim is None else x.shape[dim]
    if count <= correction:
        return
    a = sh(x)
    # Each squared deviation (|x - mean| <= 20) is within 2 * 20 * 2 + 1 units: 81 units.
    tol = 200 * ULP
    ref = torch.var(x.double(), dim, correction=correction, keepdim=keepdim)
    got = torch.var(a, dim, correction=correction, keepdim=keepdim)
    assert got.shape == ref.shape
    assert torch.allclose(reveal(got), ref, atol=tol)
    v, m = torch.var_mean(a, dim, correction=correction, keepdim=keepdim)
    ref_v, ref_m = torch.var_mean(x.double(), dim, correction=correction, keepdim=keepdim)
    assert torch.allclose(reveal(v), ref_v, atol=tol)
    assert torch.allclose(reveal(m), ref_m, atol=ULP)


def test_std_and_unbiased_overloads():
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3  # standard deviations of moderate variances
    a = sh(x)
    assert torch.allclose(reveal(a.std(0)), x.double().std(0), rtol=1e-3, atol=ULP)
    assert torch.allclose(reveal(a.std()), x.double().std(), rtol=1e-3, atol=ULP)
    assert torch.allclose(
        reveal(a.var(1, unbiased=False)), x.double().var(1, unbiased=False), atol=200 * ULP
    )
    assert torch.allclose(reveal(a.var()), x.double().var(), atol=200 * ULP)
    with pytest.raises(ValueError, match="degrees of freedom"):
        sh(torch.ones(1, 3)).var(0)


#: (name, function, absolute tolerance): each function applied to the same values in
#: plaintext and shared. Tolerances: exact comparisons and linear ops are within a few
#: units; sigmoid, exp and log carry their documented approximation errors.
ACTIVATIONS = [
    ("leaky_relu", lambda t: F.leaky_relu(t, 0.1), 4 * ULP),
    ("hardtanh", F.hardtanh, ULP),
    ("relu6", F.relu6, ULP),
    ("hardswish", F.hardswish, 1e-3),
    ("silu", F.silu, 1e-3),
    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"), 1e-3),
    ("gelu", F.gelu, 2e-3),  # exact: x (1 + erf(x / sqrt 2)) / 2, erf within 6e-4
    ("elu", F.elu, 1e-3),
    ("softplus", F.softplus, 1e-3),
    ("celu", F.celu, 1e-3),
    ("selu", F.selu, 2e-3),
    ("mish", F.mish, 2e-3),
    ("hardsigmoid", F.hardsigmoid, 2 * ULP),
    ("softsign", F.softsign, 1e-3),
    ("logaddexp", lambda t: torch.logaddexp(t, t.flip(-1)), 2e-3),
    ("cumsum", lambda t: t.cumsum(-1), 8 * ULP),
    ("flatten", lambda t: t.flatten(), 0.0),
    ("min", lambda t: t.min(-1).values, 0.0),
]


@pytest.mark.parametrize("name,fn,tol", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
@settings(max_examples=10, deadline=None)
@given(x=shaped_tensors(bound=4.0))
def test_decomposed_ops_against_plaintext(name, fn, tol, x):
    assert torch.allclose(reveal(fn(sh(x))), fn(x.double()), atol=tol), name


def test_layer_norm_against_plaintext():
    torch.manual_seed(1)
    x = torch.round(torch.randn(6, 5) * 2 * 2**16) / 2**16  # row variances of a few units
    ln = nn.LayerNorm(5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    secure = copy.deepcopy(ln).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    assert torch.allclose(reveal(secure(sh(x))), ln(x).double(), atol=2e-3)
    assert torch.allclose(
        reveal(F.layer_norm(sh(x), (5,))), F.layer_norm(x, (5,)).double(), atol=2e-3
    )


def test_group_and_instance_norm_against_plaintext():
    torch.manual_seed(2)
    x = torch.round(torch.randn(2, 4, 6) * 2 * 2**16) / 2**16  # variances of a few units
    a = sh(x)
    assert torch.allclose(reveal(F.group_norm(a, 2)), F.group_norm(x, 2).double(), atol=2e-3)
    assert torch.allclose(reveal(F.instance_norm(a)), F.instance_norm(x).double(), atol=2e-3)


def test_batch_norm_train_and_eval():
    torch.manual_seed(0)
    x = torch.randn(16, 4) * 2  # batch variances near 4
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    with pytest.raises(TypeError, match="running statistics"):
        bn(sh(x))  # a plain module cannot keep shared running statistics
    secure = copy.deepcopy(bn).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    assert torch.allclose(reveal(secure(sh(x))), bn(x).double(), atol=2e-3)
    assert torch.allclose(reveal(secure.running_mean), bn.running_mean.double(), atol=4 * ULP)
    assert torch.allclose(reveal(secure.running_var), bn.running_var.double(), atol=200 * ULP)
    bn.eval()
    secure.eval()
    assert torch.allclose(reveal(secure(sh(x))), bn(x).double(), atol=2e-3)


def test_losses_that_decompose():
    torch.manual_seed(2)
    x, y = torch.randn(10), torch.randn(10)
    p, t = torch.sigmoid(x), (y > 0).float()
    assert torch.allclose(
        reveal(F.smooth_l1_loss(sh(x), sh(y))), F.smooth_l1_loss(x, y).double(), atol=1e-4
    )
    assert torch.allclose(
        reveal(F.binary_cross_entropy(sh(p), sh(t))),
        F.binary_cross_entropy(p, t).double(),
        atol=1e-3,
    )


@pytest.mark.parametrize("serialize", [False, True])
def test_training_through_decomposed_layers_matches_plaintext(serialize):
    parties, provider = worker_parties(2, serialize=serialize)

    def model() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Linear(4, 6),
            nn.LayerNorm(6),
            nn.LeakyReLU(0.1),
            nn.Linear(6, 3),
            nn.SiLU(),
            nn.Linear(3, 3),
        )

    torch.manual_seed(4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    plain = model()
    F.mse_loss(plain(x).cumsum(1).min(1).values, y.min(1).values).backward()
    secure = model().fix_precision().share(*parties, crypto_provider=provider)
    out = secure(shared(x, parties, provider)).cumsum(1).min(1).values
    F.mse_loss(out, shared(y, parties, provider).min(1).values).backward()
    for p, q in zip(secure.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(reveal(p.grad), q.grad.double(), atol=2e-3)


@pytest.mark.parametrize(
    "layer",
    [nn.Softplus(), nn.Softplus(beta=2.0, threshold=5.0), nn.Softshrink(0.5), nn.Hardshrink(0.5),
     nn.RReLU().eval(), nn.Mish(), nn.Hardtanh(-0.5, 0.75), nn.CELU(0.5)],
    ids=lambda m: repr(m),
)
def test_activation_layers_and_their_gradients(layer):
    torch.manual_seed(5)
    x = (torch.randn(6, 7) * 3).requires_grad_()
    a = sh(x.detach()).requires_grad_()
    ref, got = layer(x), layer(a)
    assert torch.allclose(reveal(got), ref.double(), atol=2e-3)
    g = torch.randn(ref.shape)
    ref.backward(g)
    got.backward(sh(g))
    assert torch.allclose(reveal(a.grad), x.grad.double(), atol=3e-3)


def test_kl_divergence_with_shared_targets_and_its_gradient():
    """Distillation's loss: a shared student's log-probabilities against a shared teacher's
    probabilities (some exactly 0, where torch takes 0 log 0 = 0)."""
    torch.manual_seed(6)
    logits, teacher = torch.randn(4, 5).requires_grad_(), torch.softmax(torch.randn(4, 5), 1)
    teacher[0, 1] = 0.0
    a = sh(logits.detach()).requires_grad_()
    ref = F.kl_div(F.log_softmax(logits, 1), teacher, reduction="batchmean")
    got = F.kl_div(F.log_softmax(a, 1), sh(teacher), reduction="batchmean")
    assert abs(float(reveal(got)) - float(ref.detach())) < 2e-3
    ref.backward()
    got.backward()
    assert torch.allclose(reveal(a.grad), logits.grad.double(), atol=2e-3)
    public = torch.xlogy(sh(teacher), teacher)  # a public y of 0 meets an x of 0
    assert torch.allclose(reveal(public), torch.xlogy(teacher, teacher).double(), atol=1e-4)


def test_rrelu_training_is_refused():
    with pytest.raises(NotImplementedError, match="training"):
        nn.RReLU().train()(sh(torch.randn(3)))


@settings(max_examples=15)
@given(shaped_tensors(bound=10.0))
def test_logical_operations_on_comparison_results(x):
    y = torch.flip(x, [0])
    a, b = sh(x) > 0, sh(y) < 1
    p, q = x > 0, y < 1
    for got, ref in [
        (a & b, p & q),
        (a | b, p | q),
        (a ^ b, p ^ q),
        (~a, ~p),
        (torch.logical_and(a, q), p & q),
        (torch.logical_or(q, a), p | q),
        (a ^ True, p ^ True),
        (torch.logical_not(b), ~q),
    ]:
        out = got.get().float_precision()
        assert out.dtype == torch.bool
        assert torch.equal(out, ref)
    assert torch.equal(
        torch.where((a | b), sh(x), 0.0).get().float_precision().double(),
        torch.where(p | q, x, 0.0).double(),
    )


def test_logical_operations_need_bool_operands():
    with pytest.raises(NotImplementedError, match="comparison results"):
        sh(torch.ones(3)) | sh(torch.ones(3))


def test_an_unsupported_step_of_a_decomposition_names_both_ops():
    with pytest.raises(NotImplementedError, match=r"aten\.trace.*aten\.diag"):
        torch.trace(sh(torch.ones(3, 3)))


def test_registry_without_decompositions_names_the_op():
    reg = Registry("Thing")
    with pytest.raises(NotImplementedError, match=r"aten\.var\.correction.*Thing"):
        reg.lookup(torch.ops.aten.var.correction)
    assert Registry("Thing", decompose=True).lookup(torch.ops.aten.var.correction) is not None


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad])
def test_adaptive_optimizers_fail_loudly(make):
    # Their in-place steps (lerp_, addcmul_) are not run as decompositions: second moments
    # underflow 16 fractional bits and fall below sqrt's domain, so a run would be silently wrong.
    model = nn.Linear(3, 1).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    opt = make(model.parameters(), lr=0.01)
    model(sh(torch.randn(4, 3))).sum().backward()
    with pytest.raises(NotImplementedError, match=r"aten\.(lerp_|addcmul_)"):
        opt.step()


def test_bool_results_count_and_become_reals():
    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, -1.0]])
    mask = sh(x) > 1.5
    count = mask.sum(1)
    assert count.dtype == torch.int64
    assert torch.equal(count.get().float_precision(), torch.tensor([2, 2]))
    ratio = mask.float() / 3  # 0/1 values gain fractional bits before the division
    assert torch.allclose(reveal(ratio), ((x > 1.5).double() / 3), atol=ULP)
    share = mask.float() / count.unsqueeze(1)
    assert torch.allclose(reveal(share), (x > 1.5).double() / 2, atol=1e-4)
    mask |= sh(x) < 0  # in place, as autograd's formulas do
    assert torch.equal(mask.get().float_precision(), (x > 1.5) | (x < 0))
    mask &= torch.tensor([[True, False, True], [True, True, True]])
    assert torch.equal(mask.get().float_precision(), torch.tensor([[0, 0, 1], [1, 1, 1]]) > 0)


def test_where_with_public_scalars_and_nan_checks():
    x = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    a = sh(x)
    assert torch.equal(reveal(torch.where(a > 0, 1, 0)), torch.tensor([0.0, 0, 1, 1]).double())
    assert torch.equal(reveal(torch.where(a > 0, 2.5, -1)), torch.where(x > 0, 2.5, -1).double())
    assert torch.equal(reveal(torch.where(a > 0, a, 0.0)), torch.where(x > 0, x, 0.0).double())
    h = torch.heaviside(a, sh(torch.full((4,), 0.5)))
    assert torch.equal(reveal(h), torch.heaviside(x, torch.full((4,), 0.5)).double())
    assert not torch.isnan(a).any()  # as autograd's and decompositions' NaN checks ask
    with pytest.raises(veil.PrecisionOverflow, match="nan_to_num"):
        torch.nan_to_num(a)  # its decomposition encodes the largest float


def test_exact_gelu_gradient():
    x = torch.linspace(-6, 6, 41)
    ref = x.clone().requires_grad_()
    F.gelu(ref).sum().backward()
    a = sh(x).requires_grad_()
    F.gelu(a).sum().backward()  # gelu_backward runs as its decomposition: erf and exp
    assert torch.allclose(reveal(a.grad), ref.grad.double(), atol=2e-3)


LOSSES = [
    ("cross_entropy_weighted", lambda x, t: F.cross_entropy(x, t, weight=CLASS_WEIGHTS)),
    (
        "cross_entropy_weighted_sum",
        lambda x, t: F.cross_entropy(x, t, weight=CLASS_WEIGHTS, reduction="sum"),
    ),
    ("cross_entropy_smoothed", lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1)),
    (
        "bce_with_logits",
        lambda x, t: F.binary_cross_entropy_with_logits(x, F.one_hot(t, 5).float()),
    ),
    ("cosine_embedding", lambda x, t: F.cosine_similarity(x, x.flip(0)).sum()),
]
CLASS_WEIGHTS = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25])


@pytest.mark.parametrize("name,loss", LOSSES, ids=[n for n, _ in LOSSES])
def test_losses_and_their_gradients_match_plaintext(name, loss):
    torch.manual_seed(5)
    x, t = torch.randn(6, 5) * 2, torch.tensor([0, 1, 2, 3, 4, 1])
    ref = x.clone().requires_grad_()
    expected = loss(ref, t)
    expected.backward()
    a = sh(x).requires_grad_()
    got = loss(a, t)
    got.backward()
    assert torch.allclose(reveal(got), expected.double(), atol=3e-3), name
    assert torch.allclose(reveal(a.grad), ref.grad.double(), atol=3e-3), name


def test_gru_and_in_place_activations():
    torch.manual_seed(6)
    gru = nn.GRU(4, 3, batch_first=True)  # its cells run sigmoid_ and tanh_ in place
    secure = copy.deepcopy(gru).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    x = torch.randn(2, 5, 4)
    gru(x)[0].sum().backward()
    out = secure(sh(x))[0]
    assert torch.allclose(reveal(out), gru(x)[0].double(), atol=3e-3)
    out.sum().backward()
    for p, q in zip(secure.parameters(), gru.parameters(), strict=True):
        assert torch.allclose(reveal(p.grad), q.grad.double(), atol=5e-3)
    y = torch.linspace(-3, 3, 7)
    a = sh(y)
    a.sigmoid_()
    assert torch.allclose(reveal(a), torch.sigmoid(y).double(), atol=1e-3)
    b = sh(y)
    b.clamp_min_(0.5)
    assert torch.allclose(reveal(b), y.clamp_min(0.5).double(), atol=0)


def test_masked_fill_with_public_and_secret_masks():
    torch.manual_seed(7)
    x = torch.round(torch.randn(3, 4) * 2**16) / 2**16
    mask = torch.rand(3, 4) > 0.5
    assert torch.equal(reveal(sh(x).masked_fill(mask, 2.5)), x.masked_fill(mask, 2.5).double())
    a = sh(x)
    a.masked_fill_(sh(x) > 0, -1.0)
    assert torch.equal(reveal(a), x.masked_fill(x > 0, -1.0).double())


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 9), st.integers(1, 4), st.data())
def test_tensor_split_and_glu_against_plaintext(size, sections, data):
    x = torch.arange(2.0 * size).reshape(2, size) / 4
    points = sorted(data.draw(st.lists(st.integers(-1, size + 1), max_size=3)))
    split = torch.ops.aten.tensor_split
    for op, how in ((split.sections, sections), (split.indices, points)):
        got = [reveal(p) for p in op(sh(x), how, 1)]
        want = op(x, how, 1)
        assert len(got) == len(want)
        assert all(torch.equal(g, w.double()) for g, w in zip(got, want, strict=True))
    if size % 2 == 0:
        plain = x.clone().requires_grad_()
        secure = sh(x).requires_grad_()
        out, ref = F.glu(secure), F.glu(plain)
        out.sum().backward()
        ref.sum().backward()
        assert torch.allclose(reveal(out), ref.double(), atol=1e-3)
        assert torch.allclose(reveal(secure.grad), plain.grad.double(), atol=1e-3)


@pytest.mark.parametrize("scale", [0.03, 1.0, 30.0])
def test_norms_and_gradient_clipping_over_many_magnitudes(scale):
    """Norms of small and of large vectors, and clipping by them (square roots and
    reciprocals reduce their input by powers of four; the old direct approximations held
    only on [0.05, 150] and [0.01, 300])."""
    torch.manual_seed(7)
    x = torch.randn(40) * scale
    # 40 squares, each rounded to one unit: up to 40 units on the sum (3.6e-4 measured at
    # the smallest scale over 150 seeds)
    assert torch.allclose(reveal(sh(x).norm()), x.norm().double(), rtol=1e-3, atol=1e-3)
    model = nn.Linear(8, 3)
    secure = copy.deepcopy(model).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    data = torch.randn(16, 8)
    for m, xb in ((model, data * scale), (secure, sh(data * scale))):
        m(xb).sum().backward()
        nn.utils.clip_grad_norm_(m.parameters(), max_norm=1.0, foreach=False)
    for p, q in zip(secure.parameters(), model.parameters(), strict=True):
        # the clipping factor 1 / norm has 16 fractional bits: 0.4% at a norm of 500
        assert torch.allclose(reveal(p.grad), q.grad.double(), rtol=1e-2, atol=8 * ULP)


def test_group_norm_with_its_affine_parameters_trains_like_plaintext():
    """nn.GroupNorm's default (affine) form: torch's decomposition views the scaled
    statistics through as_strided with contiguous strides (a reshape here)."""
    torch.manual_seed(11)
    layer = nn.GroupNorm(2, 6)
    secure = copy.deepcopy(layer).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    x = torch.randn(3, 6, 4) * 2
    a, p = sh(x).requires_grad_(), x.clone().requires_grad_()
    out, ref = secure(a), layer(p)
    out.sum().backward()
    ref.sum().backward()
    assert torch.allclose(reveal(out), ref.detach().double(), atol=2e-3)
    assert torch.allclose(reveal(a.grad), p.grad.double(), atol=2e-3)
    for s, q in zip(secure.parameters(), layer.parameters(), strict=True):
        assert torch.allclose(reveal(s.grad), q.grad.double(), atol=2e-3)
    with pytest.raises(NotImplementedError, match="contiguous"):
        torch.as_strided(sh(torch.arange(6.0)), (2, 2), (1, 2))


def test_item_decodes_public_values_and_refuses_to_open_shares():
    assert torch.tensor([1.5, 2.0]).fix_precision().sum().item() == 3.5
    with pytest.raises(veil.ProtocolError, match=r"get\(\)"):
        shared(torch.tensor(1.5), *local_parties(2)).item()


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(), (3,), (2, 3), (2, 1, 2)]), st.integers(1, 3), st.integers(2, 4),
    st.sampled_from(["mean", "sum", "none"]), st.booleans(), st.booleans(), st.data(),
)
def test_cross_entropy_over_positions_and_single_samples(
    spatial, batch, classes, reduction, weighted, ignore, data
):
    """Segmentation-style scores (N, C, d1, ..., dk), sequences (N, C, L) and one unbatched
    sample (C,): torch sends them to nll_loss2d (or a batch of one), run per position."""
    shape = (classes,) if spatial == () and batch == 1 else (batch, classes, *spatial)
    x = data.draw(tensors(shape, 3.0))
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, classes, target_shape, generator=torch.Generator().manual_seed(
        data.draw(st.integers(0, 1000))))
    kw: dict = {"reduction": reduction}
    if weighted and reduction != "none" and len(shape) > 1:
        kw["weight"] = torch.rand(classes) + 0.5
    if ignore and target.numel() > 1:
        target.view(-1)[0] = -100
    plain, secure = x.clone().requires_grad_(), sh(x).requires_grad_()
    ref, got = F.cross_entropy(plain, target, **kw), F.cross_entropy(secure, target, **kw)
    assert torch.allclose(reveal(got), ref.detach().double(), atol=2e-3)
    grad = data.draw(tensors(tuple(ref.shape), 2.0))
    ref.backward(grad)
    got.backward(sh(grad))
    assert torch.allclose(reveal(secure.grad), plain.grad.double(), atol=2e-3)
