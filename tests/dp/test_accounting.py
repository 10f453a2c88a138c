"""Accountants against dp-accounting computed directly, and the published oracle numbers."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.dp import PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon

DELTA = 1e-5


def direct(sigma: float, q: float, steps: int, delta: float, mechanism: str) -> float:
    acc = RdpAccountant() if mechanism == "rdp" else PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


# (q, sigma, T, RDP, PLD) at delta = 1e-5; values given to 4 decimals
ORACLES = [
    (0.01, 1.1, 10000, 5.6320, 5.1926),
    (256 / 60000, 1.1, 14100, 2.6003, 2.3852),
    (32 / 404, 4.0, 650, 2.2713, 2.0848),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "rdp", "pld"), ORACLES)
def test_oracles(q, sigma, steps, rdp, pld):
    # RDP at dp-accounting's default orders reproduces the 4-decimal values exactly
    assert compute_epsilon(sigma, q, steps, DELTA, "rdp") == pytest.approx(rdp, abs=5e-5)
    assert compute_epsilon(sigma, q, steps, DELTA, "pld") == pytest.approx(pld, abs=5e-5)


def test_full_batch_oracle_exact_gaussian():
    # q = 1: 100 Gaussian steps with sigma 5 are one Gaussian with sigma 0.5, epsilon 9.99726
    exact = dp_accounting.get_epsilon_gaussian(0.5, DELTA)
    assert exact == pytest.approx(9.99726, abs=5e-6)
    assert compute_epsilon(5.0, 1.0, 100, DELTA, "pld") == pytest.approx(exact, abs=1e-3)
    rdp = compute_epsilon(5.0, 1.0, 100, DELTA, "rdp")
    assert rdp > exact  # RDP is an upper bound: 10.7255 here, 7% loose
    assert rdp == pytest.approx(10.7255, abs=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    sigma=st.floats(0.5, 20.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 5000),
    delta=st.sampled_from([1e-3, 1e-5, 1e-7]),
)
def test_rdp_equals_dp_accounting(sigma, q, steps, delta):
    assert compute_epsilon(sigma, q, steps, delta, "rdp") == direct(sigma, q, steps, delta, "rdp")


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.02, 300), (20.0, 1.0, 40)])
def test_pld_equals_dp_accounting(sigma, q, steps):
    got = compute_epsilon(sigma, q, steps, DELTA, "pld")
    assert got == pytest.approx(direct(sigma, q, steps, DELTA, "pld"), rel=1e-9)


def test_accountant_composes_history():
    acc = PrivacyAccountant("rdp")
    acc.step(1.0, 0.01, 100)
    acc.step(1.0, 0.01)
    acc.step(2.0, 0.05, 10)
    assert acc.history == [(1.0, 0.01, 101), (2.0, 0.05, 10)]
    assert acc.steps == 111
    ref = RdpAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 101)
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(2.0)), 10)
    assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-12)
    assert acc.epsilon_after(DELTA, 2.0, 0.05, 5) > acc.epsilon(DELTA)
    restored = PrivacyAccountant("pld")
    restored.load_state_dict(acc.state_dict())
    assert restored.mechanism == "rdp" and restored.history == acc.history


def test_edge_cases():
    acc = PrivacyAccountant()
    assert acc.epsilon(DELTA) == 0.0
    acc.step(1.0, 0.0, 10)  # q = 0 spends nothing
    assert acc.epsilon(DELTA) == 0.0
    acc.step(0.0, 0.1)
    assert acc.epsilon(DELTA) == math.inf
    assert compute_epsilon(1.0, 0.1, 0, DELTA) == 0.0


@pytest.mark.parametrize(("mechanism", "sigma", "q"), [("rdp", 3.0, 0.05), ("pld", 20.0, 1.0)])
def test_steps_within_is_the_boundary(mechanism, sigma, q):
    acc = PrivacyAccountant(mechanism)
    acc.step(sigma, q, 5)

    def after(k):
        return acc.epsilon_after(DELTA, sigma, q, k)

    k = acc.steps_within(1.0, DELTA, sigma, q)
    assert k > 3
    assert after(k) <= 1.0 < after(k + 1)
    acc.step(sigma, q, 3)  # the cached answer shrinks by the steps taken, no new search
    assert acc.steps_within(1.0, DELTA, sigma, q) == k - 3
    if mechanism == "rdp":
        acc.step(2 * sigma, q)  # another kind of step invalidates it
        k2 = acc.steps_within(1.0, DELTA, sigma, q)
        assert after(k2) <= 1.0 < after(k2 + 1)
    assert acc.steps_within(1.0, DELTA, sigma, 0.0) == math.inf
    assert acc.steps_within(acc.epsilon(DELTA) / 2, DELTA, sigma, q) == 0


@pytest.mark.parametrize(
    ("target", "q", "steps", "mechanism"),
    [
        (0.5, 32 / 404, 650, "rdp"),
        (8.0, 0.01, 1000, "rdp"),
        (1.0, 1.0, 50, "pld"),
        (2.0, 0.1, 100, "pld"),
    ],
)
def test_calibration_meets_target_from_below(target, q, steps, mechanism):
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, mechanism)
    eps = direct(sigma, q, steps, DELTA, mechanism)
    assert target - 1e-3 <= eps <= target


def test_calibration_impossible():
    with pytest.raises(ValueError, match="no noise multiplier"):
        calibrate_noise_multiplier(1e-6, DELTA, 1.0, 10**6, max_noise_multiplier=10.0)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: compute_epsilon(-1.0, 0.1, 10, DELTA), "noise_multiplier"),
        (lambda: compute_epsilon(1.0, 1.5, 10, DELTA), "sample_rate"),
        (lambda: compute_epsilon(1.0, 0.1, -1, DELTA), "steps"),
        (lambda: compute_epsilon(1.0, 0.1, 10, 0.0), "delta"),
        (lambda: compute_epsilon(1.0, 0.1, 10, 1.0), "delta"),
        (lambda: compute_epsilon(1.0, 0.1, 10, DELTA, "gdp"), "accountant"),
        (lambda: compute_epsilon(float("nan"), 0.1, 10, DELTA), "NaN"),
        (lambda: calibrate_noise_multiplier(-1.0, DELTA, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise_multiplier(1.0, DELTA, 0.0, 10), "sample_rate 0"),
        (lambda: PrivacyAccountant("moments"), "accountant"),
    ],
)
def test_bad_input(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_bad_types():
    with pytest.raises(TypeError):
        compute_epsilon("1", 0.1, 10, DELTA)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        compute_epsilon(1.0, 0.1, 10.5, DELTA)  # type: ignore[arg-type]
