"""train_private: the one-call DP-SGD a data owner's worker runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import veil
from veil.dp import TrainReport, compute_epsilon, train_private


def _mlp(seed=0, out=1):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, out)
    )


def test_boston_oracle_run():
    # 50 epochs of expected batch 32 on Boston's 404 training rows: q = 32/404, T = 650
    split = veil.datasets.boston()
    model = _mlp()
    report = train_private(
        model,
        split.x_train,
        split.y_train,
        epochs=50,
        batch_size=32,
        lr=0.1,
        max_grad_norm=0.3,
        noise_multiplier=4.0,
        delta=1e-5,
        seed=0,
        report_losses=True,
    )
    assert isinstance(report, TrainReport)
    assert report.steps == 650 and report.sample_rate == 32 / 404
    assert report.epsilon == pytest.approx(2.2713, abs=5e-5)
    assert len(report.losses) == 50 and report.losses[-1] < report.losses[0] / 5
    with torch.no_grad():
        test_mse = nn.functional.mse_loss(model(split.x_test), split.y_test).item()
    assert test_mse < 40  # predicting the mean gives about 88
    assert all(p.requires_grad for p in model.parameters())  # hooks removed
    assert report.to_dict()["losses"] == list(report.losses)


def test_target_epsilon_is_met():
    x, y = torch.randn(60, 13), torch.randn(60, 1)
    report = train_private(
        _mlp(),
        x,
        y,
        epochs=3,
        batch_size=12,
        lr=0.01,
        max_grad_norm=1.0,
        target_epsilon=1.5,
        delta=1e-5,
        seed=1,
    )
    assert 1.5 - 1e-3 <= report.epsilon <= 1.5
    assert report.epsilon == pytest.approx(compute_epsilon(report.noise_multiplier, 0.2, 15, 1e-5))
    assert report.losses == ()  # not reported unless asked


@pytest.mark.parametrize("loss", ["bce_with_logits", "cross_entropy"])
def test_classification_losses(loss):
    torch.manual_seed(0)
    x = torch.randn(80, 13)
    if loss == "cross_entropy":
        y, model = (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), _mlp(out=3)
    else:
        y, model = (x[:, :1] > 0).float(), _mlp()
    report = train_private(
        model,
        x,
        y,
        epochs=15,
        batch_size=20,
        lr=0.5,
        max_grad_norm=1.0,
        noise_multiplier=0.3,
        delta=1e-5,
        loss=loss,
        seed=0,
        report_losses=True,
        secure_rng=False,
    )
    assert report.losses[-1] < report.losses[0]


def test_secure_rng_and_pld():
    x, y = torch.randn(30, 13), torch.randn(30, 1)
    report = train_private(
        _mlp(),
        x,
        y,
        epochs=1,
        batch_size=30,
        lr=0.01,
        max_grad_norm=1.0,
        noise_multiplier=5.0,
        delta=1e-5,
        secure_rng=True,
        accountant="pld",
    )
    assert report.accountant == "pld" and report.steps == 1
    assert report.epsilon == pytest.approx(compute_epsilon(5.0, 1.0, 1, 1e-5, "pld"))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"noise_multiplier": None}, ValueError, "exactly one"),
        ({"target_epsilon": 1.0}, ValueError, "exactly one"),
        ({"delta": 2.0}, ValueError, "delta"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"seed": 1, "secure_rng": True}, ValueError, "seeded"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    args = {
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.1,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        **kwargs,
    }
    with pytest.raises(error, match=pattern):
        train_private(_mlp(), torch.randn(8, 13), torch.randn(8, 1), **args)


def test_bad_data():
    with pytest.raises(ValueError, match="first dimension"):
        train_private(
            _mlp(),
            torch.randn(8, 13),
            torch.randn(7, 1),
            epochs=1,
            batch_size=4,
            lr=0.1,
            max_grad_norm=1.0,
            delta=1e-5,
            noise_multiplier=1.0,
        )
    with pytest.raises(TypeError):
        train_private(
            "model",
            torch.randn(8, 13),
            torch.randn(8, 1),
            epochs=1,  # type: ignore
            batch_size=4,
            lr=0.1,
            max_grad_norm=1.0,
            delta=1e-5,
            noise_multiplier=1.0,
        )
