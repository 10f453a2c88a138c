"""DP-SGD where the data lives: one pure function from plain tensors to a trained model.

:func:`train_private` is meant to be registered as a remote function by veil's worker core, so
that a data owner's worker can train a model on its own data in one call and only the model
and a :class:`TrainReport` leave it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from veil.dp._accounting import Mechanism, calibrate_noise_multiplier
from veil.dp._checks import check_count, check_delta, check_positive
from veil.dp._engine import PrivacyEngine

LossName = Literal["mse", "bce_with_logits", "cross_entropy"]

_LOSSES = {
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
    "cross_entropy": F.cross_entropy,
}


@dataclass(frozen=True)
class TrainReport:
    """What a private training run spent and did.

    Attributes:
        epsilon: privacy spent, at ``delta``, by the run's accountant.
        delta: the delta of ``epsilon``.
        steps: optimizer steps taken (one per Poisson batch, empty ones included).
        losses: mean training loss of each epoch, if asked for (see :func:`train_private`:
            these are NOT covered by the DP guarantee), else empty.
        noise_multiplier: sigma used (calibrated when a target epsilon was given).
        sample_rate: q, expected batch size divided by the number of examples.
        accountant: ``"rdp"`` or ``"pld"``.
    """

    epsilon: float
    delta: float
    steps: int
    losses: tuple[float, ...]
    noise_multiplier: float
    sample_rate: float
    accountant: str

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values."""
        out = asdict(self)
        out["losses"] = list(self.losses)
        return out


def train_private(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    loss: LossName = "mse",
    momentum: float = 0.0,
    seed: int | None = None,
    secure_rng: bool = False,
    accountant: Mechanism = "rdp",
    report_losses: bool = False,
    progress: bool = False,
) -> TrainReport:
    """Train ``model`` in place on ``(x, y)`` with DP-SGD and report the privacy spent.

    Each of ``epochs * ceil(N / batch_size)`` steps takes a Poisson sample of the examples
    (each independently with probability ``q = batch_size / N``, so ``batch_size`` is the
    *expected* batch size), clips each example's gradient to ``max_grad_norm``, adds Gaussian
    noise of standard deviation ``noise_multiplier * max_grad_norm`` to the sum, divides by
    ``batch_size`` and takes an SGD step (with ``momentum``).

    Args:
        model: the module to train (in place); every layer with trainable parameters must be
            supported by :class:`~veil.dp.PerSampleGradients`.
        x, y: the examples and targets, batch first (``y`` as the loss expects: float targets
            for ``"mse"``/``"bce_with_logits"``, class indices for ``"cross_entropy"``).
        epochs, batch_size, lr: the schedule; ``batch_size`` is the expected batch size.
        max_grad_norm: C, the per-example clipping norm.
        delta: the delta at which epsilon is computed (and calibrated).
        noise_multiplier: sigma; give exactly one of it and ``target_epsilon``.
        target_epsilon: calibrate sigma so the whole run spends at most this (within 1e-3).
        loss: ``"mse"``, ``"bce_with_logits"`` or ``"cross_entropy"`` (summed over examples).
        seed: seed for noise and sampling (reproducible runs); ``None`` seeds from the OS.
        secure_rng: cryptographically secure noise and sampling (no seed).
        accountant: ``"rdp"`` or ``"pld"``.
        report_losses: return each epoch's mean training loss. They are computed from the
            private data without noise and are not covered by epsilon: leave this off when
            the report leaves the data owner.
        progress: show a tqdm progress bar over epochs.

    Returns:
        A :class:`TrainReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be tensors")
    n = int(x.shape[0]) if x.dim() > 0 else 0
    if n == 0 or y.dim() == 0 or y.shape[0] != n:
        raise ValueError(
            f"x and y need the same non-zero first dimension, got {x.shape}, {y.shape}"
        )
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
    epochs = check_count(epochs, "epochs", minimum=1)
    batch_size = check_count(batch_size, "batch_size", minimum=1)
    lr = check_positive(lr, "lr")
    delta = check_delta(delta)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    rate = min(1.0, batch_size / n)
    steps = epochs * max(1, math.ceil(n / batch_size))  # as DPDataLoader.from_data_loader
    if target_epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon, delta, rate, steps, accountant
        )
    loss_fn = _LOSSES[loss]

    engine = PrivacyEngine(accountant=accountant, secure_rng=secure_rng, seed=seed)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum
    )
    _, dp_optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=float(noise_multiplier),  # type: ignore[arg-type]
        max_grad_norm=max_grad_norm,
        loss_reduction="sum",
    )
    epoch_losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        bar = _progress(range(epochs), progress)
        for _ in bar:
            total, count = 0.0, 0
            for xb, yb in loader:
                dp_optimizer.zero_grad()
                batch_loss = loss_fn(model(xb), yb, reduction="sum")
                batch_loss.backward()
                dp_optimizer.step()
                if report_losses:
                    total += float(batch_loss.detach())
                    count += int(xb.shape[0])
            if report_losses:
                epoch_losses.append(total / count if count else math.nan)
    finally:
        engine.detach()
        model.train(was_training)
    return TrainReport(
        epsilon=engine.get_epsilon(delta),
        delta=delta,
        steps=engine.steps,
        losses=tuple(epoch_losses),
        noise_multiplier=float(noise_multiplier),  # type: ignore[arg-type]
        sample_rate=rate,
        accountant=accountant,
    )


def _progress(iterable: Any, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="DP-SGD", unit="epoch")
