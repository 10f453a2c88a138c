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

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_REKEY_BYTES = 1 << 30


class _AesCtrGenerator:
    """AES-256-CTR keystream keyed from OS entropy; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zeros = b""
        self._pid = -1
        self._used = 0
        self._encryptor = None

    def _rekey(self) -> None:
        cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16)))
        self._encryptor = cipher.encryptor()
        self._pid = os.getpid()
        self._used = 0

    def bytes_into(self, n: int) -> bytearray:
        """A fresh ``bytearray`` holding ``n`` random bytes (plus 15 spare bytes at the end)."""
        out = bytearray(n + 15)
        if n == 0:
            return out
        with self._lock:
            if self._encryptor is None or self._pid != os.getpid() or self._used > _REKEY_BYTES:
                self._rekey()
            if len(self._zeros) < n:
                self._zeros = bytes(max(n, 2 * len(self._zeros)))
            self._encryptor.update_into(memoryview(self._zeros)[:n], out)  # type: ignore[union-attr]
            self._used += n
        return out


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
    buf = _GENERATOR.bytes_into(8 * n)
    return torch.frombuffer(buf, dtype=torch.int64, count=n).view(tuple(shape))


def random_bits(shape: tuple[int, ...] | torch.Size | int) -> torch.Tensor:
    """Uniformly random bits (0 or 1) as int64."""
    return random_int64(shape) & 1


__all__ = ["random_bits", "random_int64"]
