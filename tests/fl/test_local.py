"""FedAvg's fused local training (one command per worker and round) against the pointer loop.

Both run the same torch operations on the workers, so they must agree to float rounding on
every worker kind, with shuffling, momentum and FedProx; and both let a model trained on a
worker's private data come home, as the pointer loop always has.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.fl as fl


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 1))


@pytest.mark.parametrize("settings", [
    dict(),
    dict(shuffle=True, momentum=0.5, local_epochs=2, lr=0.002),
    dict(prox_mu=0.1, batch_size=5, loss_fn=F.l1_loss),
], ids=["plain", "shuffle-momentum", "prox-l1"])
def test_fused_rounds_equal_the_pointer_loop(make_workers, settings):
    alice, bob = make_workers("alice", "bob")
    data = veil.datasets.boston()
    x, y = data.x_train[:90], data.y_train[:90]
    ds = fl.federate(x, y, [alice, bob])
    fused, looped = mlp(), mlp()
    kwargs = {"rounds": 2, "lr": 0.01, "seed": 3, **settings}
    before = [a.messages for a in (alice, bob)] if hasattr(alice, "messages") else None
    fl.fedavg(fused, ds, fused=True, **kwargs)
    if before is not None:
        used = sum(a.messages for a in (alice, bob)) - sum(before)
        assert used < 60  # a handful of messages per worker and round, not one per batch
    fl.fedavg(looped, ds, fused=False, **kwargs)
    for p, q in zip(fused.parameters(), looped.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_fused_training_on_private_hosted_data_comes_home():
    alice = veil.VirtualWorker("alice")
    data = veil.datasets.boston()
    px = alice.host(data.x_train[:40], tags=("#x",), private=True)
    py = alice.host(data.y_train[:40], tags=("#y",), private=True)
    ds = fl.FederatedDataset.from_pointers({alice: (px, py)})
    model = mlp()
    before = [p.clone() for p in model.parameters()]
    fl.fedavg(model, ds, rounds=1, lr=0.01)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(veil.PermissionDenied):
        (px * 1).get()  # the data itself still cannot be taken


def test_local_sgd_checks_its_arguments():
    w = veil.VirtualWorker("w")
    x, y = torch.randn(4, 13).send(w), torch.randn(4, 1).send(w)
    model = mlp().send(w)
    from veil.fl._local import train_remotely

    with pytest.raises(veil.RemoteError, match="unknown loss"):
        train_remotely(model, x, y, None, 1, 2, 0.1, 0.0, 0.0, "hinge").get()
    with pytest.raises(veil.RemoteError, match="permutation"):
        train_remotely(model, x, y, torch.zeros(1, 4, dtype=torch.int64), 1, 2, 0.1, 0.0, 0.0,
                       "mse").get()
    with pytest.raises(veil.RemoteError, match="lr"):
        train_remotely(model, x, y, None, 1, 2, -1.0, 0.0, 0.0, "mse").get()
    assert train_remotely(model, x, y, None, 1, 2, 0.1, 0.0, 0.0, "mse").get().shape == (
        sum(p.numel() for p in mlp().parameters()),)
