"""Building blocks for client-level DP in federated averaging (DP-FedAvg, McMahan et al. 2018).

One round, with ``n`` clients taking part out of ``W``:

1. each client computes its model update (new weights minus the round's starting weights) and
   calls :func:`clip_update` on its own worker, so the update's L2 norm over all tensors is at
   most ``max_norm`` (C);
2. the server averages the clipped updates (plainly or by secure aggregation) and calls
   :func:`add_aggregate_noise`, which adds N(0, (sigma * C / n)^2) to every coordinate: the
   Gaussian mechanism with noise sigma * C on the sum, divided by ``n``;
3. :class:`ClientLevelAccountant` records the round as a Poisson-sampled Gaussian step with
   sampling rate ``n / W`` and can refuse a round that would go over a budget.

The guarantee is at the level of clients (any one client's whole data may be added or removed)
and assumes clients are sampled at random each round with probability ``n / W``; ``n`` in the
divisor should be that expected number (a constant), and updates are weighted uniformly (weights
by sample counts would let one client move the sum by more than C).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from veil._errors import PrivacyBudgetExceeded
from veil.dp._accounting import Mechanism, PrivacyAccountant
from veil.dp._checks import check_count, check_delta, check_noise_multiplier, check_positive
from veil.dp._noise import NoiseSource, TorchNoise


def _check_update(update: Mapping[str, Tensor]) -> None:
    if not isinstance(update, Mapping) or not update:
        raise ValueError("an update must be a non-empty mapping of names to tensors")
    for name, t in update.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"update entry {name!r} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise ValueError(
                f"update entry {name!r} has dtype {t.dtype}; DP updates must be floating point "
                "(leave integer buffers out of the update)"
            )


def update_norm(update: Mapping[str, Tensor]) -> float:
    """The L2 norm of an update over all its tensors (computed in float64)."""
    _check_update(update)
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in update.values()))


def clip_update(update: Mapping[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], float]:
    """Scale ``update`` so its L2 norm over all tensors is at most ``max_norm``.

    Returns ``(clipped, norm)``: the scaled copy (``update * min(1, C / norm)``) and the norm
    before clipping. Runs where the update is (on the client's worker).
    """
    c = check_positive(max_norm, "max_norm")
    norm = update_norm(update)
    factor = 1.0 if norm <= c else c / norm
    with torch.no_grad():
        clipped = {k: t.detach() * factor for k, t in update.items()}
    return clipped, norm


def add_aggregate_noise(
    avg_update: Mapping[str, Tensor],
    noise_multiplier: float,
    max_norm: float,
    n_clients: int | float,
    *,
    generator: torch.Generator | NoiseSource | None = None,
) -> dict[str, Tensor]:
    """The average of clipped updates plus N(0, (sigma * max_norm / n_clients)^2) per entry.

    Args:
        avg_update: the sum of the clipped updates divided by ``n_clients``.
        noise_multiplier: sigma.
        max_norm: C, the bound each update was clipped to.
        n_clients: the divisor used for the average (the expected clients per round).
        generator: a seeded ``torch.Generator`` or a :class:`~veil.dp.NoiseSource` (e.g.
            :class:`~veil.dp.SecureNoise`); default a generator seeded from the OS.
    """
    _check_update(avg_update)
    sigma = check_noise_multiplier(noise_multiplier)
    c = check_positive(max_norm, "max_norm")
    n = check_positive(n_clients, "n_clients")
    std = sigma * c / n
    source: NoiseSource
    if generator is None:
        source = TorchNoise()
    elif isinstance(generator, torch.Generator):
        source = _GeneratorNoise(generator)
    elif isinstance(generator, NoiseSource):
        source = generator
    else:
        raise TypeError(f"generator must be a torch.Generator or a NoiseSource, got {generator!r}")
    out = {}
    with torch.no_grad():
        for name, t in avg_update.items():
            noise = source.normal_(torch.empty_like(t, dtype=torch.float64), std) if std > 0 else 0
            out[name] = (t.detach().double() + noise).to(t.dtype)
    return out


class _GeneratorNoise:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def normal_(self, out: Tensor, std: float) -> Tensor:
        return out.normal_(0.0, std, generator=self.generator)

    def bernoulli(self, n: int, p: float) -> Tensor:
        return torch.rand(n, generator=self.generator) < p


class ClientLevelAccountant:
    """Client-level privacy of DP-FedAvg rounds, with an optional budget.

    Args:
        noise_multiplier: sigma of :func:`add_aggregate_noise`.
        total_clients: W, the size of the client population.
        accountant: ``"rdp"`` or ``"pld"``.
        max_epsilon, delta: a budget; :meth:`check_round` raises
            :class:`veil.PrivacyBudgetExceeded` for a round that would go over it.
    """

    def __init__(
        self,
        noise_multiplier: float,
        total_clients: int,
        *,
        accountant: Mechanism = "rdp",
        max_epsilon: float | None = None,
        delta: float | None = None,
    ) -> None:
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.total_clients = check_count(total_clients, "total_clients", minimum=1)
        self.accountant = PrivacyAccountant(accountant)
        if max_epsilon is not None and delta is None:
            raise ValueError("a budget (max_epsilon) needs a delta")
        self.max_epsilon = (
            None if max_epsilon is None else check_positive(max_epsilon, "max_epsilon")
        )
        self.delta = None if delta is None else check_delta(delta)

    def sample_rate(self, clients_per_round: int) -> float:
        """``clients_per_round / total_clients`` (at most 1)."""
        k = check_count(clients_per_round, "clients_per_round", minimum=1)
        return min(1.0, k / self.total_clients)

    def check_round(self, clients_per_round: int) -> None:
        """Raise :class:`veil.PrivacyBudgetExceeded` if this round would overspend."""
        if self.max_epsilon is None or self.delta is None:
            return
        q = self.sample_rate(clients_per_round)
        if self.accountant.steps_within(self.max_epsilon, self.delta, self.noise_multiplier, q) < 1:
            after = self.accountant.epsilon_after(self.delta, self.noise_multiplier, q, 1)
            raise PrivacyBudgetExceeded(
                f"this round would bring client-level epsilon to {after:.4f} at delta "
                f"{self.delta}, over the budget of {self.max_epsilon}"
            )

    def record_round(self, clients_per_round: int) -> None:
        """Check the budget, then record one round."""
        self.check_round(clients_per_round)
        self.accountant.step(self.noise_multiplier, self.sample_rate(clients_per_round))

    def epsilon(self, delta: float) -> float:
        """Client-level epsilon spent so far at ``delta``."""
        return self.accountant.epsilon(delta)

    @property
    def rounds(self) -> int:
        return self.accountant.steps


def client_level_epsilon(
    noise_multiplier: float,
    clients_per_round: int,
    total_clients: int,
    rounds: int,
    delta: float,
    accountant: Mechanism = "rdp",
) -> float:
    """Client-level epsilon of ``rounds`` DP-FedAvg rounds (sampling rate ``k / W``)."""
    acc = ClientLevelAccountant(noise_multiplier, total_clients, accountant=accountant)
    acc.accountant.step(
        acc.noise_multiplier, acc.sample_rate(clients_per_round), check_count(rounds, "rounds")
    )
    return acc.epsilon(delta)
