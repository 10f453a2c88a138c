"""DP-FedAvg building blocks: clipping updates, aggregate noise, client-level accounting."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

import veil
from veil.dp import (
    ClientLevelAccountant,
    SecureNoise,
    add_aggregate_noise,
    client_level_epsilon,
    clip_update,
    update_norm,
)


def test_clip_update_scales_to_the_bound():
    update = {"w": torch.full((3, 4), 1.0), "b": torch.full((4,), 1.0)}  # norm 4
    clipped, norm = clip_update(update, 2.0)
    assert norm == pytest.approx(4.0)
    assert update_norm(clipped) == pytest.approx(2.0)
    assert torch.allclose(clipped["w"], torch.full((3, 4), 0.5))
    same, norm2 = clip_update(update, 10.0)
    assert norm2 == pytest.approx(4.0) and torch.equal(same["b"], update["b"])
    assert update["w"][0, 0] == 1.0  # input untouched


def test_update_validation():
    with pytest.raises(ValueError, match="floating point"):
        clip_update({"steps": torch.tensor(3)}, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        clip_update({}, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_update({"w": torch.ones(2)}, 0.0)
    with pytest.raises(TypeError, match="not a tensor"):
        clip_update({"w": [1.0]}, 1.0)  # type: ignore[dict-item]


def test_aggregate_noise_scale_and_sources():
    avg = {"w": torch.zeros(100, 100)}
    noisy = add_aggregate_noise(avg, 1.5, 2.0, 10, generator=torch.Generator().manual_seed(0))
    assert noisy["w"].dtype == torch.float32
    assert noisy["w"].std().item() == pytest.approx(1.5 * 2.0 / 10, rel=0.03)
    again = add_aggregate_noise(avg, 1.5, 2.0, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy["w"], again["w"])
    secure = add_aggregate_noise(avg, 1.5, 2.0, 10, generator=SecureNoise())
    assert secure["w"].std().item() == pytest.approx(0.3, rel=0.03)
    plain = add_aggregate_noise({"w": torch.ones(3)}, 0.0, 1.0, 4)
    assert torch.equal(plain["w"], torch.ones(3))
    with pytest.raises(ValueError, match="n_clients"):
        add_aggregate_noise(avg, 1.0, 1.0, 0)
    with pytest.raises(TypeError, match="generator"):
        add_aggregate_noise(avg, 1.0, 1.0, 2, generator=3)  # type: ignore[arg-type]


def test_client_level_epsilon_matches_dp_accounting():
    eps = client_level_epsilon(1.2, 10, 100, 50, 1e-5)
    ref = RdpAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 50)
    assert eps == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)


def test_client_level_budget():
    acc = ClientLevelAccountant(2.0, 20, max_epsilon=3.0, delta=1e-5)
    rounds = 0
    with pytest.raises(veil.PrivacyBudgetExceeded, match="client-level"):
        while True:
            acc.record_round(5)
            rounds += 1
    assert acc.rounds == rounds > 0
    assert acc.epsilon(1e-5) <= 3.0
    assert acc.sample_rate(50) == 1.0
    assert math.isfinite(acc.epsilon(1e-5))
    with pytest.raises(ValueError, match="delta"):
        ClientLevelAccountant(1.0, 20, max_epsilon=3.0)
