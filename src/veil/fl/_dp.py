"""Client-level differential privacy for FedAvg (DP-FedAvg, McMahan et al., 2018).

Each round, every participating client's update is clipped to L2 norm ``max_norm`` on its
own worker; the server sums the clipped updates (in the clear or by secure aggregation),
adds Gaussian noise of standard deviation ``noise_multiplier * max_norm`` to the sum and
divides by the number of clients. One client's data changes the noisy sum by at most
``max_norm``, so each round is a Gaussian mechanism on the set of clients; composition over
rounds is accounted with Google's ``dp-accounting`` (RDP), with sampling rate
``clients per round / total clients``.

Updates are weighted uniformly here: weighting by sample counts would let one client's data
move the sum by more than ``max_norm``.
"""

from __future__ import annotations

from typing import Any

import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant

from veil._errors import PrivacyBudgetExceeded
from veil.fl._secure_agg import secure_sum
from veil.fl._strategy import ClientUpdate, Strategy


class DPFedAvg(Strategy):
    """FedAvg with clipped client updates and Gaussian noise at the server.

    Args:
        noise_multiplier: noise std divided by ``max_norm`` (sigma).
        max_norm: L2 bound of each client's update.
        total_clients: how many clients the population has (for the sampling rate).
        delta: the delta at which :meth:`epsilon` is reported.
        max_epsilon: a round that would take epsilon past this raises
            :class:`veil.PrivacyBudgetExceeded` before any update is used.
        secure: sum the clipped updates by secure aggregation.
        generator: the noise source (default: seeded from the OS's entropy).
    """

    name = "DP-FedAvg"

    def __init__(self, noise_multiplier: float, max_norm: float, total_clients: int, *,
                 delta: float = 1e-5, max_epsilon: float | None = None, secure: bool = False,
                 generator: torch.Generator | None = None):
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        if total_clients < 1:
            raise ValueError(f"total_clients must be >= 1, got {total_clients}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_norm = float(max_norm)
        self.total_clients = total_clients
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.secure = secure
        self.rounds: list[float] = []  # sampling rate of each round taken
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        self.generator = generator

    def epsilon(self, delta: float | None = None, extra_rates: tuple[float, ...] = ()) -> float:
        """Client-level epsilon spent so far (plus ``extra_rates`` hypothetical rounds)."""
        rates = [*self.rounds, *extra_rates]
        if not rates:
            return 0.0
        if self.noise_multiplier == 0:
            return float("inf")
        acc = RdpAccountant()
        for q in rates:
            acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(self.noise_multiplier)))
        return float(acc.get_epsilon(self.delta if delta is None else delta))

    def state(self) -> dict[str, Any]:
        return {"rounds": list(self.rounds), "generator": self.generator.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rounds = [float(q) for q in state["rounds"]]
        self.generator.set_state(state["generator"])

    def aggregate(self, updates: list[ClientUpdate]) -> torch.Tensor:
        rate = min(1.0, len(updates) / self.total_clients)
        if self.max_epsilon is not None:
            after = self.epsilon(extra_rates=(rate,))
            if after > self.max_epsilon:
                raise PrivacyBudgetExceeded(
                    f"this round would bring client-level epsilon to {after:.3f} at delta "
                    f"{self.delta}, over the budget of {self.max_epsilon}")
        clipped = []
        for u in updates:  # clipping runs on each client's worker
            with torch.no_grad():
                norm = u.update.norm()
                factor = (norm / self.max_norm).clamp(min=1.0).reciprocal()
                clipped.append(u.update * factor)
        if self.secure and len(clipped) > 1:
            total = secure_sum(clipped, [1.0] * len(clipped))
        else:
            total = torch.zeros(clipped[0].shape, dtype=torch.float64)
            for c in clipped:
                total += c.get().double()
        noise = torch.normal(0.0, self.noise_multiplier * self.max_norm, total.shape,
                             generator=self.generator, dtype=torch.float64)
        self.rounds.append(rate)
        return (total + noise) / len(updates)
