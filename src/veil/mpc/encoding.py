"""Fixed-point encoding of real numbers in the ring Z_2^64 (held in int64, wrapping).

A real ``x`` is stored as the integer ``round(x * 2^f)`` where ``f`` is the number of
fractional bits (``precision_bits``, 16 by default). The ring is Z_2^64: int64 arithmetic
wraps around, and every protocol works modulo 2^64.

Representable range: ``|x * 2^f| < 2^62`` (for ``f = 16``: ``|x| < 2^46``, about 7e13).
Encoding a value outside it (or NaN/inf) raises :class:`veil.PrecisionOverflow`. The
headroom above 2^62 is what the secure protocols need: sums of two encodings stay below
2^63, and comparisons work on differences below 2^62 in absolute value.

Decoding is exact: the integer part ``v >> f`` (an arithmetic shift, so a floor) and the
fraction ``v & (2^f - 1)`` (always non-negative) are converted separately and added, so
negative values just below an integer (``-3 - 2^-16``) decode exactly, with no off-by-one
from truncating toward zero.
"""

from __future__ import annotations

import math

import torch

from veil._errors import PrecisionOverflow

#: Default number of fractional bits.
DEFAULT_PRECISION = 16
#: Encodings must stay strictly below this in absolute value.
ENCODE_LIMIT = 2**62
#: Largest supported number of fractional bits.
MAX_PRECISION = 40


def check_precision(precision_bits: int) -> int:
    """Validate ``precision_bits`` (an int in [0, 40]) and return it."""
    if type(precision_bits) is not int or not 0 <= precision_bits <= MAX_PRECISION:
        raise ValueError(
            f"precision_bits must be an int in [0, {MAX_PRECISION}], got {precision_bits!r}"
        )
    return precision_bits


def encode(x: torch.Tensor | float | int, precision_bits: int = DEFAULT_PRECISION) -> torch.Tensor:
    """``round(x * 2^precision_bits)`` as int64.

    Raises:
        veil.PrecisionOverflow: a value is NaN, infinite, or ``|x * 2^f| >= 2^62``.
    """
    check_precision(precision_bits)
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x, dtype=torch.float64)
    if x.dtype == torch.bool:
        x = x.to(torch.int64)
    if not x.is_floating_point():
        v = x.to(torch.int64)
        if v.numel() and int(v.abs().max()) >= ENCODE_LIMIT >> precision_bits:
            raise PrecisionOverflow(
                f"an integer does not fit the fixed-point range: |x| * 2^{precision_bits} "
                "must stay below 2^62"
            )
        return v << precision_bits
    scaled = x.detach().to(torch.float64) * float(2**precision_bits)
    if scaled.numel():
        big = scaled.abs().max()
        if not torch.isfinite(big) or float(big) >= ENCODE_LIMIT:
            raise PrecisionOverflow(
                f"a value does not fit the fixed-point range: |x| * 2^{precision_bits} must "
                f"stay below 2^62 (|x| < {2.0 ** (62 - precision_bits):.4g}), and NaN or inf "
                "cannot be encoded"
            )
    return torch.round(scaled).to(torch.int64)


def decode(
    v: torch.Tensor, precision_bits: int = DEFAULT_PRECISION, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The real values ``v / 2^precision_bits`` of int64 encodings, as ``dtype`` (exact)."""
    check_precision(precision_bits)
    if v.dtype != torch.int64:
        raise TypeError(f"decode() takes int64 encodings, got {v.dtype}")
    if precision_bits == 0:
        return v.to(dtype)
    # int64 -> float64 rounds once (exact below 2^53) and a power-of-two scale is exact, so
    # this is v / 2^f correctly rounded. (Adding an integer part and a fraction, as before,
    # rounded twice once |v| / 2^f reached 2^53.)
    out = v.to(torch.float64) * 2.0**-precision_bits
    if dtype is torch.float64:
        return out
    narrow = out.to(dtype)
    if dtype is torch.float32:
        big = (v > 2**53) | (v < -(2**53))  # not exact in float64: round once, to float32
        if bool(big.any()):
            narrow = torch.where(big, v.to(torch.float32) * 2.0**-precision_bits, narrow)
    return narrow


def scalar_multiplier(value: float, *, bits: int = 24, max_shift: int = 56) -> tuple[int, int]:
    """An integer ``m`` and shift ``s`` with ``m / 2^s`` close to ``value`` (``bits`` significant).

    Multiplying a ring element by a public real ``value`` is done as ``(x * m) >> s``; choosing
    ``s`` per value keeps about ``bits`` significant bits of ``value`` (a learning rate of
    0.001 encoded with only 16 fractional bits would be off by 0.7%).
    """
    if value == 0:
        return 0, 0
    _, exponent = math.frexp(abs(value))  # abs(value) = mantissa * 2^exponent, mantissa in [0.5, 1)
    shift = bits - exponent
    shift = max(0, min(shift, max_shift))
    m = round(value * 2.0**shift)
    return m, shift


def wrap(v: int) -> int:
    """A Python int reduced to the signed int64 range (mod 2^64)."""
    return ((v + 2**63) % 2**64) - 2**63


__all__ = [
    "DEFAULT_PRECISION",
    "ENCODE_LIMIT",
    "MAX_PRECISION",
    "check_precision",
    "decode",
    "encode",
    "scalar_multiplier",
    "wrap",
]
