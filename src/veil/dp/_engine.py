"""The friendly entry point: make a model, optimizer and data loader private in one call."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from veil.dp._accounting import Mechanism, PrivacyAccountant, calibrate_noise_multiplier
from veil.dp._checks import check_count, check_delta, check_positive
from veil.dp._data import DPDataLoader
from veil.dp._grad_sample import LossReduction, PerSampleGradients
from veil.dp._noise import NoiseSource, make_noise
from veil.dp._optimizer import DPOptimizer


class PrivacyEngine:
    """Makes one training setup differentially private and keeps its privacy accounts.

    Args:
        accountant: ``"rdp"`` (Renyi DP, fast) or ``"pld"`` (privacy loss distributions,
            tighter, slower), used for :meth:`get_epsilon`, calibration and the budget; or an
            existing :class:`~veil.dp.PrivacyAccountant` (for instance another engine's
            ``.accountant``) to continue its accounts: training that touches the same data in
            several stages (another model, another phase) then composes into one epsilon, and
            ``max_epsilon`` bounds the stages together.
        secure_rng: draw noise and Poisson samples from :class:`~veil.dp.SecureNoise` (a
            ChaCha20 stream keyed from the OS) instead of a ``torch.Generator``.
        seed: seed of the ``torch.Generator`` for reproducible experiments (not with
            ``secure_rng``); ``None`` seeds from the OS.
        max_epsilon: a budget: an optimizer step that would take epsilon at ``delta`` past it
            raises :class:`veil.PrivacyBudgetExceeded` before it runs.
        delta: the delta of the budget (``make_private_with_epsilon`` uses its
            ``target_delta`` when this is not given).

    Example::

        engine = veil.dp.PrivacyEngine(max_epsilon=8.0, delta=1e-5)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.1, max_grad_norm=1.0)
        for x, y in loader:                 # Poisson batches; some may be empty
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()                # clip, noise, average, step, account
        engine.get_epsilon(1e-5)
    """

    def __init__(
        self,
        *,
        accountant: Mechanism | PrivacyAccountant = "rdp",
        secure_rng: bool = False,
        seed: int | None = None,
        max_epsilon: float | None = None,
        delta: float | None = None,
    ) -> None:
        self.accountant = (
            accountant
            if isinstance(accountant, PrivacyAccountant)
            else PrivacyAccountant(accountant)
        )
        self.noise: NoiseSource = make_noise(secure_rng, seed)
        self.secure_rng = secure_rng
        self.max_epsilon = (
            None if max_epsilon is None else check_positive(max_epsilon, "max_epsilon")
        )
        self.delta = None if delta is None else check_delta(delta)
        self.per_sample: PerSampleGradients | None = None
        self.optimizer: DPOptimizer | None = None

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        poisson_sampling: bool = True,
        loss_reduction: LossReduction = "mean",
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Make ``module``, ``optimizer`` and ``data_loader`` private.

        Args:
            module: the model; it is hooked in place and returned (same object). Its
                trainable parameters get ``requires_grad=False`` while private (veil computes
                their gradients); :meth:`detach` restores them.
            optimizer: built over the module's parameters; wrapped in a :class:`DPOptimizer`.
            data_loader: its dataset and ``batch_size`` (the expected batch size E) are used:
                each example joins each batch with probability ``q = E / N``, for
                ``ceil(N / E)`` batches an epoch.
            noise_multiplier: sigma; the noise on the sum of clipped gradients has standard
                deviation ``sigma * max_grad_norm``.
            max_grad_norm: C, the L2 bound of each example's gradient.
            poisson_sampling: ``False`` keeps the loader's own batches (shuffled, fixed size);
                the accountant still assumes Poisson sampling, so epsilon is then an
                approximation (a warning says so).
            loss_reduction: ``"mean"`` or ``"sum"``, how the loss combines examples.

        Returns:
            ``(module, optimizer, data_loader)``, to use as before.
        """
        if self.per_sample is not None:
            raise ValueError("this PrivacyEngine already made a model private; use a new one")
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a DataLoader, got {type(data_loader).__name__}")
        n = len(data_loader.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("the data loader's dataset is empty")
        if poisson_sampling:
            loader: DataLoader = DPDataLoader.from_data_loader(data_loader, noise=self.noise)
            rate = loader.sample_rate  # type: ignore[attr-defined]
        else:
            if data_loader.batch_size is None:
                raise ValueError("the data loader needs a batch_size (its expected batch size)")
            warnings.warn(
                "poisson_sampling=False: batches are not Poisson samples, so the reported "
                "epsilon (which assumes Poisson sampling) is only an approximation",
                stacklevel=2,
            )
            loader = data_loader
            rate = min(1.0, data_loader.batch_size / n)
        if self.max_epsilon is not None and self.delta is None:
            raise ValueError("PrivacyEngine(max_epsilon=...) needs delta=... for the budget")
        per_sample = PerSampleGradients(module, loss_reduction=loss_reduction)
        try:
            dp_optimizer = DPOptimizer(
                optimizer,
                per_sample,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=rate * n,
                noise=self.noise,
                accountant=self.accountant,
                sample_rate=rate,
                max_epsilon=self.max_epsilon,
                delta=self.delta,
            )
        except Exception:
            per_sample.remove()
            raise
        self.per_sample, self.optimizer = per_sample, dp_optimizer
        return module, dp_optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        poisson_sampling: bool = True,
        loss_reduction: LossReduction = "mean",
        epsilon_tolerance: float = 1e-3,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Like :meth:`make_private`, with sigma calibrated so that ``epochs`` epochs spend
        ``target_epsilon`` at ``target_delta`` (within ``epsilon_tolerance``, never over)."""
        target_delta = check_delta(target_delta, "target_delta")
        epochs = check_count(epochs, "epochs", minimum=1)
        n = len(data_loader.dataset)  # type: ignore[arg-type]
        if data_loader.batch_size is None or n == 0:
            raise ValueError("the data loader needs a batch_size and a non-empty dataset")
        rate = min(1.0, data_loader.batch_size / n)
        steps = epochs * max(1, -(-n // data_loader.batch_size))
        sigma = calibrate_noise_multiplier(
            target_epsilon,
            target_delta,
            rate,
            steps,
            self.accountant.mechanism,  # type: ignore[arg-type]
            epsilon_tolerance=epsilon_tolerance,
        )
        if self.delta is None:
            self.delta = target_delta
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
            loss_reduction=loss_reduction,
        )

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``."""
        return self.accountant.epsilon(delta)

    @property
    def steps(self) -> int:
        """Private steps taken so far."""
        return self.accountant.steps

    def detach(self) -> None:
        """Remove the hooks and restore ``requires_grad`` (the accounts are kept)."""
        if self.per_sample is not None:
            self.per_sample.remove()

    def state_dict(self) -> dict[str, Any]:
        """The accountant's state (for checkpoints; noise generator state is not saved)."""
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accounts from :meth:`state_dict`."""
        self.accountant.load_state_dict(state["accountant"])
