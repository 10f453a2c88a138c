"""Unchanged torch.nn models, losses, autograd and SGD on shared fixed-point tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.mpc
from tests.mpc.helpers import local_parties, reveal, worker_parties
from veil.mpc import FixedPrecisionTensor


def _share_data(x, parties, provider):
    return x.fix_precision().share(*parties, crypto_provider=provider)


def _grads(model):
    return [p.grad for p in model.parameters()]


def _compare_step(model, x, y, loss_fn, parties, provider, lr=0.1, tol=2e-3, steps=2):
    """Train a copy in plaintext and a shared copy; losses, grads and weights must match."""
    ref = copy.deepcopy(model)
    secure = copy.deepcopy(model).fix_precision().share(*parties, crypto_provider=provider)
    xs = _share_data(x, parties, provider)
    ys = _share_data(y, parties, provider) if y.is_floating_point() else y
    opt_r = torch.optim.SGD(ref.parameters(), lr=lr)
    opt_s = torch.optim.SGD(secure.parameters(), lr=lr)
    for _ in range(steps):
        opt_r.zero_grad()
        opt_s.zero_grad()
        loss_r = loss_fn(ref(x), y)
        loss_s = loss_fn(secure(xs), ys)
        loss_r.backward()
        loss_s.backward()
        assert isinstance(loss_s, FixedPrecisionTensor) and loss_s.is_shared
        assert abs(reveal(loss_s).item() - loss_r.item()) < tol * max(1.0, abs(loss_r.item()))
        for gs, gr in zip(_grads(secure), _grads(ref)):
            assert gs.is_shared
            assert torch.allclose(reveal(gs), gr.double(), atol=tol, rtol=tol)
        opt_r.step()
        opt_s.step()
    secure.get().float_precision()
    for ps, pr in zip(secure.parameters(), ref.parameters()):
        assert type(ps) is nn.Parameter
        assert torch.allclose(ps.double(), pr.double(), atol=tol)


def test_linear_mse_sgd_local():
    torch.manual_seed(0)
    parties, provider = local_parties(2)
    _compare_step(
        nn.Linear(13, 1), torch.randn(8, 13), torch.randn(8, 1), F.mse_loss, parties, provider
    )


def test_relu_mlp_over_workers():
    torch.manual_seed(1)
    parties, provider = worker_parties(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    _compare_step(model, torch.randn(6, 5), torch.randn(6, 1), F.mse_loss, parties, provider)


def test_three_party_training():
    torch.manual_seed(2)
    parties, provider = local_parties(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    _compare_step(model, torch.randn(5, 4), torch.randn(5, 1), F.mse_loss, parties, provider)


def test_conv_sigmoid_pools_cross_entropy():
    torch.manual_seed(3)
    parties, provider = local_parties(2)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    x = torch.randn(2, 1, 6, 6)
    y = torch.tensor([0, 2])
    _compare_step(model, x, y, F.cross_entropy, parties, provider, lr=0.5, tol=5e-3, steps=1)


def test_tanh_softmax_and_soft_targets():
    torch.manual_seed(4)
    parties, provider = local_parties(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    x = torch.randn(3, 4)
    y = torch.softmax(torch.randn(3, 3), 1)
    _compare_step(model, x, y, F.cross_entropy, parties, provider, tol=5e-3, steps=1)


def test_module_conversions_and_errors():
    torch.manual_seed(5)
    model = nn.Linear(3, 2)
    w = model.weight.detach().clone()
    model.fix_precision()
    assert isinstance(model.weight, FixedPrecisionTensor) and isinstance(model.weight, nn.Parameter)
    model.share("a", "b", crypto_provider="c")
    assert model.weight.is_shared and model.weight.requires_grad
    with pytest.raises(veil.ProtocolError):
        model.float_precision()
    model.get().float_precision()
    assert torch.allclose(model.weight, w, atol=2**-16)
    with pytest.raises(veil.ProtocolError, match="fix_precision"):
        nn.Linear(2, 2).share("a", "b")


def test_model_trained_on_private_data_stays_private():
    alice, bob, carol, dave = (veil.VirtualWorker(n) for n in ("alice", "bob", "carol", "dave"))
    x = dave.host(torch.randn(4, 3), private=True)
    y = dave.host(torch.randn(4, 1), private=True)
    model = nn.Linear(3, 1).fix_precision().share(alice, bob, crypto_provider=carol)
    xs = x.fix_precision().share(alice, bob, crypto_provider=carol)
    ys = y.fix_precision().share(alice, bob, crypto_provider=carol)
    loss = F.mse_loss(model(xs), ys)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(veil.PermissionDenied):
        loss.get()
    with pytest.raises(veil.PermissionDenied):
        model.get()


def test_unsupported_layer_names_the_op():
    model = nn.Embedding(5, 3, max_norm=1.0).fix_precision()
    with pytest.raises(NotImplementedError, match=r"aten\.embedding_renorm_"):
        model(torch.tensor([0, 2]))
    with pytest.raises(NotImplementedError, match=r"aten\.pow.*exponent 0\.3"):
        torch.randn(3).fix_precision() ** 0.3
