"""Shared helpers of the SMPC tests: party sets, hypothesis strategies, plaintext oracles."""

from __future__ import annotations

import os
from typing import Any

import torch
from hypothesis import strategies as st

import veil
import veil.mpc

veil.mpc._methods.install()

#: Fractional bits used by the tests (the default).
F = 16
ULP = 2.0**-F


#: ``VEIL_TEST_PARTIES=k`` runs the tests that use :func:`local_parties` with ``max(n, k)``
#: virtual workers instead (``VEIL_TEST_SERIALIZE=1``: serializing ones), so the same oracle
#: checks cover the distributed protocol with that many parties (``make test`` does k = 3).
TEST_PARTIES = int(os.environ.get("VEIL_TEST_PARTIES", "0") or 0)
TEST_SERIALIZE = bool(os.environ.get("VEIL_TEST_SERIALIZE"))


def local_parties(n: int = 2) -> tuple[tuple[Any, ...], Any]:
    """Names of ``n`` simulated parties and a provider (shares are local tensors), or
    workers when ``VEIL_TEST_PARTIES`` is set (see :data:`TEST_PARTIES`)."""
    if TEST_PARTIES:
        return worker_parties(max(n, TEST_PARTIES), serialize=TEST_SERIALIZE)
    return tuple(f"p{i}" for i in range(n)), "dealer"


def worker_parties(
    n: int = 2, serialize: bool = False
) -> tuple[tuple[veil.Worker, ...], veil.Worker]:
    """``n`` virtual workers and a provider worker."""
    parties = tuple(veil.VirtualWorker(f"party{i}", serialize=serialize) for i in range(n))
    return parties, veil.VirtualWorker("provider", serialize=serialize)


def shared(
    x: torch.Tensor, parties: tuple, provider, truncation: str = "dealer"
) -> veil.mpc.FixedPrecisionTensor:
    return x.fix_precision().share(*parties, crypto_provider=provider, truncation=truncation)


def reveal(x: veil.mpc.FixedPrecisionTensor) -> torch.Tensor:
    return x.get().float_precision().double()


def train_mse(model: torch.nn.Module, x: Any, y: Any, steps: int, lr: float) -> None:
    """``steps`` SGD steps of ``model`` on the MSE of ``model(x)`` against ``y`` (plain or
    shared alike), for tests that train a plain model and its secure copy side by side."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def shapes(max_dims: int = 3, max_side: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims).map(tuple)


def tensors(shape: tuple[int, ...], bound: float = 100.0) -> st.SearchStrategy[torch.Tensor]:
    """Float tensors of ``shape`` whose values are exact multiples of 2^-16 in [-bound, bound]."""
    n = 1
    for s in shape:
        n *= s
    limit = int(bound * 2**F)
    return st.lists(st.integers(-limit, limit), min_size=n, max_size=n).map(
        lambda v: (torch.tensor(v, dtype=torch.float64) / 2**F).reshape(shape).float()
    )


def shaped_tensors(max_dims: int = 3, max_side: int = 5, bound: float = 100.0):
    return shapes(max_dims, max_side).flatmap(lambda s: tensors(s, bound))


def dealer_values(bundles: tuple[torch.Tensor, ...], arith_len: int) -> torch.Tensor:
    """The provider's ``(count, total)`` values from the parties' full bundles: the sum of
    the arithmetic columns, the XOR of the others."""
    arith = sum(b[:, :arith_len] for b in bundles)
    xor = bundles[0][:, arith_len:].clone()
    for b in bundles[1:]:
        xor ^= b[:, arith_len:]
    return torch.cat([arith, xor], 1)
