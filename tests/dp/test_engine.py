"""DPOptimizer and PrivacyEngine: the step's formula, noise, budgets, loaders, schedulers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import veil
from tests.dp.helpers import loop_grads
from veil.dp import (
    DPDataLoader,
    DPOptimizer,
    NoPerSampleGradients,
    PerSampleGradients,
    PrivacyAccountant,
    PrivacyEngine,
    TorchNoise,
    compute_epsilon,
)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))


def _data(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


def _mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_is_clipped_sum_plus_noise_over_expected_batch(reduction):
    model = _mlp()
    x, y = _data(7).tensors
    per_example = loop_grads(model, (x, y), lambda m, a, b: _mse(m, a, b) * 1.0)
    sigma, clip, expected = 0.8, 0.5, 10.0
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        PerSampleGradients(model, loss_reduction=reduction),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected,
        noise=TorchNoise(seed=3),
    )
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.mse_loss(model(x), y, reduction=reduction)
    loss.backward()
    opt.step()
    norms = torch.sqrt(sum(g.reshape(7, -1).square().sum(1) for g in per_example.values()))
    factor = (clip / norms).clamp(max=1.0)
    flat_noise = torch.empty(sum(p.numel() for p in model.parameters()))
    TorchNoise(seed=3).normal_(flat_noise, sigma * clip / expected)
    offset = 0
    for (name, g), p, b in zip(per_example.items(), model.parameters(), before):
        noise = flat_noise[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        want = torch.tensordot(factor, g, dims=1) / expected + noise
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(b - p.detach(), want, atol=1e-6, rtol=1e-5)  # lr = 1
    torch.testing.assert_close(opt.last_norms, norms, atol=1e-5, rtol=1e-5)


def test_noise_has_the_documented_scale():
    model = nn.Linear(50, 40)  # 2040 parameters; zero inputs and grads -> pure noise
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        PerSampleGradients(model),
        noise_multiplier=2.0,
        max_grad_norm=3.0,
        expected_batch_size=4.0,
        noise=TorchNoise(seed=0),
    )
    model(torch.zeros(0, 50)).sum().backward()  # an empty batch
    opt.step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads.mean().abs() < 0.1
    assert grads.std().item() == pytest.approx(2.0 * 3.0 / 4.0, rel=0.05)


def test_step_without_backward_is_refused():
    model = _mlp()
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        PerSampleGradients(model),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    with pytest.raises(NoPerSampleGradients):
        opt.step()


def test_optimizer_validation():
    model = _mlp()
    psg = PerSampleGradients(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4}
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPOptimizer(sgd, psg, **{**kw, "noise_multiplier": -0.1})
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPOptimizer(sgd, psg, **{**kw, "max_grad_norm": 0.0})
    with pytest.raises(ValueError, match="budget"):
        DPOptimizer(sgd, psg, **kw, max_epsilon=1.0)
    with pytest.raises(ValueError, match="delta"):
        DPOptimizer(
            sgd,
            psg,
            **kw,
            accountant=PrivacyAccountant(),
            sample_rate=0.1,
            max_epsilon=1.0,
            delta=1.5,
        )
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not in the private module"):
        DPOptimizer(torch.optim.SGD([*model.parameters(), other.weight], lr=0.1), psg, **kw)
    with pytest.raises(TypeError):
        DPOptimizer("sgd", psg, **kw)  # type: ignore[arg-type]


def test_engine_end_to_end_and_epsilon():
    model = _mlp()
    engine = PrivacyEngine(seed=0)
    model2, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_data(40), batch_size=8),
        noise_multiplier=1.3,
        max_grad_norm=1.0,
    )
    assert model2 is model and isinstance(loader, DPDataLoader)
    assert loader.sample_rate == pytest.approx(0.2) and len(loader) == 5
    sizes = []
    for _ in range(2):
        for x, y in loader:
            sizes.append(len(x))
            opt.zero_grad()
            _mse(model, x, y).backward()
            opt.step()
    assert engine.steps == 10 and len(set(sizes)) > 1  # Poisson: sizes vary
    assert engine.get_epsilon(1e-5) == pytest.approx(compute_epsilon(1.3, 0.2, 10, 1e-5))
    engine.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_engine_trains_a_model():
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1
    model = nn.Linear(4, 1)
    engine = PrivacyEngine(seed=1)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=50),
        noise_multiplier=0.5,
        max_grad_norm=5.0,
    )
    for _ in range(30):
        for xb, yb in loader:
            opt.zero_grad()
            _mse(model, xb, yb).backward()
            opt.step()
    with torch.no_grad():
        assert _mse(model, x, y).item() < 0.05


def test_make_private_with_epsilon_meets_target():
    model = _mlp()
    engine = PrivacyEngine(accountant="rdp", seed=0)
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_data(40), batch_size=10),
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=3,
        max_grad_norm=1.0,
    )
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            _mse(model, x, y).backward()
            opt.step()
    eps = engine.get_epsilon(1e-5)
    assert 3.0 - 1e-3 <= eps <= 3.0
    assert engine.delta == 1e-5


def test_budget_stops_before_the_step():
    model = _mlp()
    engine = PrivacyEngine(seed=0, max_epsilon=2.0, delta=1e-5)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_data(40), batch_size=20),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    allowed = engine.accountant.steps_within(2.0, 1e-5, 1.0, 0.5)
    x, y = _data(40).tensors
    for _ in range(allowed):
        opt.zero_grad()
        _mse(model, x[:20], y[:20]).backward()
        opt.step()
    assert engine.get_epsilon(1e-5) <= 2.0
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    _mse(model, x[:20], y[:20]).backward()
    with pytest.raises(veil.PrivacyBudgetExceeded, match=r"budget of 2\.0"):
        opt.step()
    assert engine.steps == allowed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_engines_sharing_an_accountant_compose_and_share_the_budget():
    """Two training stages on the same rows (another model, another rate) count as one."""
    x, y = _data(40).tensors
    first = PrivacyEngine(accountant="pld", seed=0, max_epsilon=3.0, delta=1e-5)
    linear = nn.Linear(4, 1)
    linear, opt, _ = first.make_private(
        module=linear,
        optimizer=torch.optim.SGD(linear.parameters(), lr=0.1),
        data_loader=DataLoader(_data(40), batch_size=10),
        noise_multiplier=1.5,
        max_grad_norm=1.0,
    )
    for _ in range(3):
        opt.zero_grad()
        _mse(linear, x[:10], y[:10]).backward()
        opt.step()
    second = PrivacyEngine(accountant=first.accountant, seed=1, max_epsilon=3.0, delta=1e-5)
    assert second.accountant is first.accountant
    model = _mlp()
    model, opt, _ = second.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(40), batch_size=20),
        noise_multiplier=1.5,
        max_grad_norm=1.0,
    )
    allowed = first.accountant.steps_within(3.0, 1e-5, 1.5, 0.5)
    for _ in range(allowed):
        opt.zero_grad()
        _mse(model, x[:20], y[:20]).backward()
        opt.step()
    assert first.accountant.history == [(1.5, 0.25, 3), (1.5, 0.5, allowed)]
    separate = compute_epsilon(1.5, 0.5, allowed, 1e-5, "pld")
    assert second.get_epsilon(1e-5) == first.get_epsilon(1e-5) > separate
    assert first.get_epsilon(1e-5) <= 3.0
    opt.zero_grad()
    _mse(model, x[:20], y[:20]).backward()
    with pytest.raises(veil.PrivacyBudgetExceeded):
        opt.step()  # the first stage's steps count against the second stage's budget
    with pytest.raises(ValueError, match="accountant"):
        PrivacyEngine(accountant="moments")  # type: ignore[arg-type]


def test_budget_needs_delta():
    engine = PrivacyEngine(max_epsilon=1.0)
    model = _mlp()
    with pytest.raises(ValueError, match="delta"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    assert all(p.requires_grad for p in model.parameters())  # nothing left hooked


def test_engine_is_single_use_and_validates():
    engine = PrivacyEngine()
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.make_private(
        module=model,
        optimizer=sgd,
        data_loader=DataLoader(_data(), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    with pytest.raises(ValueError, match="already"):
        engine.make_private(
            module=_mlp(),
            optimizer=sgd,
            data_loader=DataLoader(_data(), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    with pytest.raises(ValueError, match="seeded"):
        PrivacyEngine(secure_rng=True, seed=1)
    with pytest.raises(ValueError, match="delta"):
        PrivacyEngine(delta=0.0)


def test_without_poisson_sampling_warns():
    model = _mlp()
    loader = DataLoader(_data(), batch_size=4, shuffle=True)
    with pytest.warns(UserWarning, match="Poisson"):
        _, _, out = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    assert out is loader


def test_seeded_runs_repeat_and_secure_runs_work():
    def run(**kw):
        model = _mlp()
        engine = PrivacyEngine(**kw)
        model, opt, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=8),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
        for x, y in loader:
            opt.zero_grad()
            _mse(model, x, y).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(seed=5), run(seed=5))
    assert not torch.equal(run(seed=5), run(seed=6))
    secure = run(secure_rng=True)
    assert torch.isfinite(secure).all()


def test_scheduler_and_state_dict_pass_through():
    model = _mlp()
    engine = PrivacyEngine(seed=0)
    _, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=DataLoader(_data(), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data().tensors
    opt.zero_grad()
    _mse(model, x, y).backward()
    opt.step()
    sched.step()
    assert opt.original_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    state = opt.state_dict()
    assert state["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert len(state["state"]) == 4  # momentum buffers
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    restored = PrivacyEngine()
    restored.load_state_dict(engine.state_dict())
    assert restored.get_epsilon(1e-5) == engine.get_epsilon(1e-5) > 0


def test_empty_poisson_batches_still_step():
    model = _mlp()
    engine = PrivacyEngine(seed=0)
    _, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(40), batch_size=1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    empty = 0
    for x, y in loader:  # q = 1/40: many batches are empty
        empty += len(x) == 0
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y, reduction="sum").backward()
        opt.step()
    assert empty > 0 and engine.steps == 40
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(engine.get_epsilon(1e-5))
