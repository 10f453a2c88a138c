"""DP-SGD where the data lives: dp_sgd_mlp as one remote call, private_fedavg's accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.fl as fl
from veil.dp import compute_epsilon


def data(n: int = 20, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def test_mlp_shape():
    model = fl.mlp([3, 4, 1])
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(ValueError, match="widths"):
        fl.mlp([3])


def test_noise_free_full_batch_dp_sgd_is_gradient_descent(make_workers):
    """sigma 0, no clipping, q = 1: every step is full-batch GD, run on the worker."""
    alice = make_workers("alice")
    x, y = data()
    torch.manual_seed(0)
    model = fl.mlp([3, 4, 1])
    start = flat(model)
    before = start.clone()
    params, spent = fl.dp_sgd_mlp(x.send(alice), y.send(alice), start, [3, 4, 1], 3, 20,
                                  0.05, 0.1, 1e6, 0.0, 1e-5)
    assert params.location is alice
    params, spent = params.get(), spent.get()
    assert spent[1].item() == 3 and math.isinf(spent[0].item())
    opt = torch.optim.SGD([{"params": model[2].parameters(), "lr": 0.1},
                           {"params": model[0].parameters(), "lr": 0.05}])
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert torch.allclose(params, flat(model), atol=1e-6)
    assert torch.equal(start, before)  # the caller's tensor is not trained in place


def test_dp_sgd_mlp_checks_its_arguments():
    x, y = data()
    p = flat(fl.mlp([3, 4, 1]))
    with pytest.raises(ValueError, match="parameters"):
        fl.dp_sgd_mlp(x, y, p[:-1], [3, 4, 1], 1, 8, 0.1, 0.1, 1.0, 1.0, 1e-5)
    with pytest.raises(ValueError, match="loss"):
        fl.dp_sgd_mlp(x, y, p, [3, 4, 1], 1, 8, 0.1, 0.1, 1.0, 1.0, 1e-5, loss="hinge")
    with pytest.raises(ValueError, match="ema"):
        fl.dp_sgd_mlp(x, y, p, [3, 4, 1], 1, 8, 0.1, 0.1, 1.0, 1.0, 1e-5, ema=1.0)


def test_private_fedavg_spends_at_most_the_target():
    x, y = data(41)
    ds = fl.federate(x, y, [veil.VirtualWorker("alice"), veil.VirtualWorker("bob")])
    model = fl.mlp([3, 8, 1])
    rounds = []
    result = fl.private_fedavg(model, ds, rounds=3, local_epochs=2, batch_size=5,
                               lr_hidden=0.05, lr_output=0.1, max_grad_norm=1.0, delta=1e-5,
                               target_epsilon=1.0, ema=0.5,
                               on_round=lambda r, m: rounds.append(r))
    assert rounds == [1, 2, 3] and len(result.round_seconds) == 3
    # alice has 21 rows: 5 batches an epoch; bob 20: 4
    assert result.steps == {"alice": 3 * 2 * 5, "bob": 3 * 2 * 4}
    assert 0.99 <= result.epsilon <= 1.0
    assert result.epsilon == pytest.approx(
        compute_epsilon(result.noise_multiplier, 5 / 21, 30, 1e-5))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_private_fedavg_checks_its_arguments():
    x, y = data()
    ds = fl.federate(x, y, [veil.VirtualWorker("alice"), veil.VirtualWorker("bob")])
    kw = dict(rounds=1, local_epochs=1, batch_size=4, lr_hidden=0.1, lr_output=0.1,
              max_grad_norm=1.0, delta=1e-5)
    with pytest.raises(TypeError, match="Linear"):
        fl.private_fedavg(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), ds,
                          target_epsilon=1.0, **kw)
    with pytest.raises(TypeError, match="Linear"):
        fl.private_fedavg(nn.Linear(3, 1), ds, target_epsilon=1.0, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        fl.private_fedavg(fl.mlp([3, 1]), ds, target_epsilon=1.0, noise_multiplier=1.0, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        fl.private_fedavg(fl.mlp([3, 1]), ds, **kw)
    with pytest.raises(ValueError, match="positive"):
        fl.private_fedavg(fl.mlp([3, 1]), ds, target_epsilon=1.0, **{**kw, "rounds": 0})


def test_adam_on_a_public_target_range_is_adam_on_the_mapped_targets():
    """sigma 0, q = 1, no clipping: DP-Adam on (y - c) / s is Adam on the scaled model, and
    the parameters come back as those of the model that predicts y."""
    x, y = data()
    y = 30 + 10 * y
    torch.manual_seed(0)
    model = fl.mlp([3, 4, 1])
    start = flat(model)
    params, _ = fl.dp_sgd_mlp(x, y, start, [3, 4, 1], 4, 20, 0.01, 0.02, 1e6, 0.0, 1e-5,
                              optimizer="adam", target_center=30.0, target_scale=10.0)
    with torch.no_grad():
        model[2].weight.div_(10.0)
        model[2].bias.sub_(30.0).div_(10.0)
    opt = torch.optim.Adam([{"params": model[2].parameters(), "lr": 0.02},
                            {"params": model[0].parameters(), "lr": 0.01}])
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(model(x), (y - 30.0) / 10.0).backward()
        opt.step()
    with torch.no_grad():
        model[2].weight.mul_(10.0)
        model[2].bias.mul_(10.0).add_(30.0)
    assert torch.allclose(params, flat(model), atol=1e-5)


def test_dp_sgd_mlp_checks_optimizer_and_target_range():
    x, y = data()
    p = flat(fl.mlp([3, 4, 1]))
    args = (x, y, p, [3, 4, 1], 1, 8, 0.1, 0.1, 1.0, 1.0, 1e-5)
    with pytest.raises(ValueError, match="optimizer"):
        fl.dp_sgd_mlp(*args, optimizer="lbfgs")
    with pytest.raises(ValueError, match="target_scale"):
        fl.dp_sgd_mlp(*args, target_scale=0.0)
    with pytest.raises(ValueError, match="target_scale"):
        fl.dp_sgd_mlp(*args, target_center=float("nan"))
    with pytest.raises(ValueError, match="mse"):
        fl.dp_sgd_mlp(*args, loss="bce_with_logits", target_scale=2.0)


def test_private_fedavg_with_a_seed_is_reproducible():
    x, y = data(41)

    def once() -> torch.Tensor:
        ds = fl.federate(x, y, [veil.VirtualWorker("alice"), veil.VirtualWorker("bob")])
        torch.manual_seed(0)
        model = fl.mlp([3, 8, 1])
        fl.private_fedavg(model, ds, rounds=2, local_epochs=1, batch_size=5, lr_hidden=0.01,
                          lr_output=0.01, max_grad_norm=1.0, delta=1e-5, target_epsilon=1.0,
                          optimizer="adam", target_center=0.0, target_scale=3.0, seed=7)
        return flat(model)

    assert torch.equal(once(), once())
