"""Aggregation strategies: how the clients' updates of a round become one update.

A :class:`Strategy` receives, for each client that finished the round, a pointer to its flat
parameter update (still on the client's worker) and its number of samples, and returns the
averaged update as a local float64 tensor. Implement :meth:`Strategy.aggregate` to add one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from veil.fl._secure_agg import secure_sum
from veil.pointers import PointerTensor
from veil.workers import Worker


@dataclass
class ClientUpdate:
    """One client's result of a round: its flat update stays on ``worker`` until aggregated."""

    worker: Worker
    num_samples: int
    update: PointerTensor


class Strategy(ABC):
    """How updates are combined. Subclasses implement :meth:`aggregate`."""

    #: A short name for reports.
    name: str = "strategy"

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep of this strategy (e.g. privacy spent). Default: none."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state` returned."""

    @abstractmethod
    def aggregate(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """Return the round's update (float64, flat) from the clients' ``updates``.

        Args:
            updates: at least one update; each ``update.update`` is a pointer on its worker.
        """


class FedAvg(Strategy):
    """Federated averaging (McMahan et al., 2017): the mean of the updates, weighted by
    each client's number of samples. The aggregator sees each client's update."""

    name = "FedAvg"

    def aggregate(self, updates: list[ClientUpdate]) -> torch.Tensor:
        total = sum(u.num_samples for u in updates)
        out = torch.zeros(updates[0].update.shape, dtype=torch.float64)
        for u in updates:
            out += u.update.get().double() * (u.num_samples / total)
        return out


class SecureFedAvg(Strategy):
    """FedAvg whose weighted sum is computed by additive secret sharing among the clients.

    No party, the aggregator included, sees an individual update (see
    :mod:`veil.fl._secure_agg` for the protocol). Needs at least two clients per round.
    The result equals :class:`FedAvg` up to fixed-point rounding (``precision_bits``).
    """

    name = "SecureFedAvg"

    def __init__(self, precision_bits: int = 24):
        self.precision_bits = precision_bits

    def aggregate(self, updates: list[ClientUpdate]) -> torch.Tensor:
        total = sum(u.num_samples for u in updates)
        summed = secure_sum([u.update for u in updates],
                            [float(u.num_samples) for u in updates], self.precision_bits)
        return summed / total
