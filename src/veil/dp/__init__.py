"""Differential privacy for PyTorch training: DP-SGD, privacy accounting and DP-FedAvg pieces.

DP-SGD (Abadi et al., 2016) with Poisson sampling::

    import veil.dp

    engine = veil.dp.PrivacyEngine(accountant="rdp", max_epsilon=8.0, delta=1e-5)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=64),   # 64 = expected batch size
        noise_multiplier=1.1, max_grad_norm=1.0)
    for x, y in loader:                 # Poisson batches: random sizes, possibly empty
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()                # clip each example's gradient, add noise, average
    engine.get_epsilon(1e-5)            # at any point; "pld" accounting is also available

or ``engine.make_private_with_epsilon(..., target_epsilon=2.0, target_delta=1e-5, epochs=20)``
to calibrate the noise multiplier (the target is met within 1e-3 and never exceeded).

What a step does. Every example joins a batch independently with probability
``q = E / N`` (E = the loader's ``batch_size``, the *expected* batch size), so batch sizes
vary and may be 0. Each example's gradient ``g_i`` is clipped to L2 norm ``C``
(``max_grad_norm``); Gaussian noise of standard deviation ``sigma * C`` is added to the sum;
the result is divided by ``E`` (not by the realized batch size, which would leak whether an
example is present) and handed to the wrapped optimizer. An empty batch yields noise / E.

Pieces, usable alone:

* :class:`PerSampleGradients`: per-sample gradients, norms and clipped sums by forward hooks
  (Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, RNN/GRU/LSTM; others raise
  :class:`UnsupportedLayerError` naming the layer; :func:`register_grad_rule` adds more).
* :class:`DPOptimizer`, :class:`DPDataLoader`, :class:`PoissonSampler`.
* :class:`PrivacyAccountant`, :func:`compute_epsilon`, :func:`calibrate_noise_multiplier`
  (through Google's ``dp-accounting``: RDP and PLD).
* :class:`TorchNoise` (seedable) and :class:`SecureNoise` (ChaCha20 from OS entropy).
* :func:`train_private`: DP-SGD on plain tensors in one call (for workers that own the data),
  returning a :class:`TrainReport`.
* DP-FedAvg: :func:`clip_update`, :func:`add_aggregate_noise`, :class:`ClientLevelAccountant`,
  :func:`client_level_epsilon`.

Budgets raise :class:`veil.PrivacyBudgetExceeded` before the step that would overspend runs.
"""

from veil.dp._accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from veil.dp._checks import NoPerSampleGradients, UnsupportedLayerError
from veil.dp._data import DPDataLoader, PoissonSampler
from veil.dp._engine import PrivacyEngine
from veil.dp._fedavg import (
    ClientLevelAccountant,
    add_aggregate_noise,
    client_level_epsilon,
    clip_update,
    update_norm,
)
from veil.dp._grad_sample import PerSampleGradients
from veil.dp._noise import NoiseSource, SecureNoise, TorchNoise
from veil.dp._optimizer import DPOptimizer
from veil.dp._rules import GradRule, register_grad_rule
from veil.dp._train import TrainReport, train_private

__all__ = [
    "ClientLevelAccountant",
    "DPDataLoader",
    "DPOptimizer",
    "GradRule",
    "NoPerSampleGradients",
    "NoiseSource",
    "PerSampleGradients",
    "PoissonSampler",
    "PrivacyAccountant",
    "PrivacyEngine",
    "SecureNoise",
    "TorchNoise",
    "TrainReport",
    "UnsupportedLayerError",
    "add_aggregate_noise",
    "calibrate_noise_multiplier",
    "client_level_epsilon",
    "clip_update",
    "compute_epsilon",
    "register_grad_rule",
    "train_private",
    "update_norm",
]
