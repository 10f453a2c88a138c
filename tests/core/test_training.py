"""Remote models: send/get, forward, backward as one command, torch optimizers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil


def paper_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 1))


class Custom(nn.Module):
    """A user's own module: its forward runs locally on pointers, op by op."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(13, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * 2)


def _train(model, batches, epochs, momentum=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=momentum)
    for _ in range(epochs):
        for xb, yb in batches:
            opt.zero_grad()
            loss = F.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
    return loss


@pytest.mark.parametrize("factory", [paper_mlp, Custom], ids=["sequential", "custom"])
def test_paper_mlp_remote_equals_local(make_workers, factory, kind):
    """The paper's setup on data living on a worker gives the same weights as locally."""
    alice = make_workers("alice")
    data = veil.datasets.boston()
    x, y = data.x_train, data.y_train
    epochs = 10 if kind == "virtual" else 2
    local = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 404, 8)]
    remote = [(a.send(alice), b.send(alice)) for a, b in local]
    expected = factory()
    _train(expected, local, epochs)
    model = factory().send(alice)
    assert all(isinstance(p, veil.PointerTensor) for p in model.parameters())
    loss = _train(model, remote, epochs)
    assert isinstance(loss, veil.PointerTensor) and loss.shape == ()
    model.get()
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for got, want in zip(model.parameters(), expected.parameters()):
        assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_momentum_state_lives_on_worker(make_workers):
    alice = make_workers("alice")
    data = veil.datasets.boston()
    batches = [(data.x_train[i:i + 8], data.y_train[i:i + 8]) for i in range(0, 64, 8)]
    expected = paper_mlp()
    _train(expected, batches, 1, momentum=0.9)
    model = paper_mlp().send(alice)
    _train(model, [(a.send(alice), b.send(alice)) for a, b in batches], 1, momentum=0.9)
    for got, want in zip(model.get().parameters(), expected.parameters()):
        assert torch.allclose(got, want, atol=1e-6)


def test_grad_is_a_pointer(make_workers):
    alice = make_workers("alice")
    model = nn.Linear(3, 1).send(alice)
    assert model.weight.grad is None
    x = torch.ones(2, 3).send(alice)
    model(x).sum().backward()
    g = model.weight.grad
    assert isinstance(g, veil.PointerTensor) and g.shape == (1, 3)
    assert torch.allclose(g.get(), torch.full((1, 3), 2.0))
    model.zero_grad()
    assert model.weight.grad is None


def test_adam_runs_remotely(make_workers):
    alice = make_workers("alice")
    torch.manual_seed(1)
    local = nn.Linear(4, 1)
    remote = nn.Linear(4, 1)
    remote.load_state_dict(local.state_dict())
    remote.send(alice)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    px, py = x.send(alice), y.send(alice)
    for model, a, b in ((local, x, y), (remote, px, py)):
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(5):
            opt.zero_grad()
            F.mse_loss(model(a), b).backward()
            opt.step()
    remote.get()
    assert torch.allclose(remote.weight, local.weight, atol=1e-6)


def test_eval_mode_reaches_the_worker(make_workers):
    alice = make_workers("alice")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).send(alice)
    x = torch.ones(1, 4).send(alice)
    model.eval()
    a, b = model(x).get(), model(x).get()
    assert torch.equal(a, b)


def test_module_errors(make_workers):
    alice = make_workers("alice")
    model = nn.Linear(2, 1)
    with pytest.raises(veil.ProtocolError, match="not sent"):
        model.get()
    model.send(alice)
    with pytest.raises(veil.ProtocolError, match="already on alice"):
        model.send(alice)
