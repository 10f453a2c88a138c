"""Sources of randomness for DP: Gaussian noise and Poisson sampling.

:class:`TorchNoise` uses a ``torch.Generator`` (seeded for reproducible experiments, or from the
operating system's entropy when no seed is given). Its output is predictable to anyone who
learns the seed or the generator's state, which is fine for research but not for deployments
that must withstand an adversary.

:class:`SecureNoise` draws its bits from a ChaCha20 key stream keyed by 32 bytes of
``os.urandom`` (through the ``cryptography`` package), so its output cannot be predicted from
earlier output or reproduced without the key; it is never seeded. Gaussians come from the
Box-Muller transform in float64 on 53-bit uniforms. Note that this does not address the
floating-point side channels of Mironov (CCS 2012): noise is added in the parameters' dtype.
"""

from __future__ import annotations

import math
import os
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from veil.dp._checks import check_count


@runtime_checkable
class NoiseSource(Protocol):
    """What DP code needs from a source of randomness."""

    def normal_(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """Fill ``out`` in place with independent N(0, std**2) draws and return it."""
        ...

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """A bool tensor of ``n`` independent draws that are True with probability ``p``."""
        ...


class TorchNoise:
    """Randomness from a ``torch.Generator``.

    Args:
        seed: seed for reproducible runs; ``None`` seeds from the OS's entropy.
    """

    secure = False

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def normal_(self, out: torch.Tensor, std: float) -> torch.Tensor:
        return out.normal_(0.0, std, generator=self.generator)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(check_count(n, "n"), generator=self.generator) < p

    def __repr__(self) -> str:
        return "TorchNoise()"


class SecureNoise:
    """Cryptographically secure randomness: a ChaCha20 key stream keyed from ``os.urandom``."""

    secure = True

    def __init__(self) -> None:
        key, nonce = os.urandom(32), os.urandom(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms in (0, 1], from 53 random bits each (never 0)."""
        raw = np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8")
        return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53

    def normal(self, n: int) -> np.ndarray:
        """``n`` float64 standard normal draws (Box-Muller)."""
        n = check_count(n, "n")
        half = (n + 1) // 2
        u = self._uniform(2 * half)
        radius = np.sqrt(-2.0 * np.log(u[:half]))
        angle = (2.0 * math.pi) * u[half:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def normal_(self, out: torch.Tensor, std: float) -> torch.Tensor:
        z = torch.from_numpy(self.normal(out.numel()) * std)
        with torch.no_grad():
            out.copy_(z.view(out.shape))
        return out

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        return torch.from_numpy(self._uniform(check_count(n, "n")) <= p)

    def __repr__(self) -> str:
        return "SecureNoise()"


def make_noise(secure: bool = False, seed: int | None = None) -> NoiseSource:
    """A :class:`SecureNoise` (``secure=True``; a seed is refused) or a :class:`TorchNoise`."""
    if secure:
        if seed is not None:
            raise ValueError("a secure noise source cannot be seeded; pass seed=None")
        return SecureNoise()
    return TorchNoise(seed)
