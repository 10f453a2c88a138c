"""Validation of the numbers DP code is given: clear errors, never ``assert``."""

from __future__ import annotations

import math

from veil._errors import VeilError


class UnsupportedLayerError(VeilError, TypeError):
    """A layer with trainable parameters has no per-sample gradient rule (the message names it)."""


class NoPerSampleGradients(VeilError, RuntimeError):
    """A private optimizer step found no recorded forward/backward pass to use."""


def check_delta(delta: float, name: str = "delta") -> float:
    """``delta`` as a float in the open interval (0, 1)."""
    delta = _as_float(delta, name)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {delta}")
    return delta


def check_noise_multiplier(sigma: float, name: str = "noise_multiplier") -> float:
    """A noise multiplier: finite and >= 0 (0 means no noise and infinite epsilon)."""
    sigma = _as_float(sigma, name)
    if not sigma >= 0.0 or math.isinf(sigma):
        raise ValueError(f"{name} must be a finite number >= 0, got {sigma}")
    return sigma


def check_positive(value: float, name: str) -> float:
    """A finite number > 0."""
    value = _as_float(value, name)
    if not value > 0.0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_sample_rate(q: float, name: str = "sample_rate") -> float:
    """A sampling probability in [0, 1]."""
    q = _as_float(q, name)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {q}")
    return q


def check_count(n: int, name: str, minimum: int = 0) -> int:
    """An integer >= ``minimum`` (bools are refused)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def _as_float(value: float, name: str) -> float:
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if math.isnan(out):
        raise ValueError(f"{name} must not be NaN")
    return out
