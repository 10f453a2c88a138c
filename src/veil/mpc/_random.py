"""Cryptographically secure randomness for shares, masks and dealer material.

Every random ring element veil's SMPC code draws comes from :func:`random_int64`: an AES-256
key and a 128-bit counter block from the operating system's entropy (``os.urandom``) drive
AES in counter mode (the ``cryptography`` package, OpenSSL underneath); the keystream *is*
the random data. AES-CTR is a standard CSPRNG construction (NIST SP 800-90A's CTR_DRBG uses
the same core); the key is replaced with fresh OS entropy every 2^30 bytes and after a
``fork``. The global torch and numpy generators are never used.

Each process has one generator; in a real deployment every worker (a party, the crypto
provider) runs in its own process and so draws from its own generator.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_REKEY_BYTES = 1 << 30


class _AesCtrGenerator:
    """AES-256-CTR keystream keyed from OS entropy; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._used = 0
        self._encryptor = None

    def _rekey(self) -> None:
        cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16)))
        self._encryptor = cipher.encryptor()
        self._pid = os.getpid()
        self._used = 0

    def int64(self, n: int) -> torch.Tensor:
        """``n >= 1`` fresh random int64 values."""
        with self._lock:
            if self._encryptor is None or self._pid != os.getpid() or self._used > _REKEY_BYTES:
                self._rekey()
            out = _keystream(self._encryptor, n)
            self._used += 8 * n
        return out


_ZEROS = b""


def _keystream(encryptor: Any, n: int) -> torch.Tensor:
    """The next ``8 n`` bytes of a CTR ``encryptor``'s keystream as ``n >= 1`` int64 values:
    the encryption of zero bytes, read from one buffer allocated once and grown as needed (a
    fresh zero buffer per call cost more than the encryption)."""
    global _ZEROS
    zeros = _ZEROS
    if len(zeros) < 8 * n:
        zeros = _ZEROS = bytes(max(8 * n, 2 * len(zeros)))
    out = bytearray(8 * n + 15)  # update_into may need a block's worth of room
    encryptor.update_into(memoryview(zeros)[: 8 * n], out)
    return torch.frombuffer(out, dtype=torch.int64, count=n)


_GENERATOR = _AesCtrGenerator()


def random_int64(shape: tuple[int, ...] | torch.Size | int) -> torch.Tensor:
    """Uniformly random int64 values (uniform ring elements of Z_2^64), from AES-CTR."""
    if isinstance(shape, int):
        shape = (shape,)
    n = 1
    for s in shape:
        n *= int(s)
    if n == 0:
        return torch.zeros(tuple(shape), dtype=torch.int64)
    return _GENERATOR.int64(n).view(tuple(shape))


def random_bits(shape: tuple[int, ...] | torch.Size | int) -> torch.Tensor:
    """Uniformly random bits (0 or 1) as int64."""
    return random_int64(shape) & 1


#: Words (int64) in a seed: an AES-256 key.
SEED_WORDS = 4


def random_seed() -> torch.Tensor:
    """A fresh seed for :func:`expand_seed`: 256 bits from the operating system's entropy."""
    return torch.frombuffer(bytearray(os.urandom(8 * SEED_WORDS)), dtype=torch.int64)


def expand_seed(seed: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` pseudorandom int64 values determined by ``seed``: the AES-256-CTR keystream
    keyed by the seed's 32 bytes (counter from zero). The party holding the seed and the
    provider that drew it expand the same values; to anyone without the seed they are
    indistinguishable from uniform.

    Raises:
        ValueError: ``seed`` is not :data:`SEED_WORDS` int64 values, or ``n`` is negative.
    """
    if seed.dtype != torch.int64 or seed.numel() != SEED_WORDS:
        raise ValueError(f"a seed is {SEED_WORDS} int64 values, got {seed.dtype} "
                         f"{tuple(seed.shape)}")
    if type(n) is not int or n < 0:
        raise ValueError(f"the number of values must be a non-negative int, got {n!r}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    key = seed.contiguous().numpy().tobytes()
    return _keystream(Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor(), n)


__all__ = ["SEED_WORDS", "expand_seed", "random_bits", "random_int64", "random_seed"]
