"""SMPC protocols over additive shares: Beaver products, truncation, comparisons.

Each protocol is a function of explicit arguments (a :class:`~veil.mpc._runtime.Context` and
per-party share lists) built from registered per-party steps, so that it runs the same on
local shares and on shares held by workers.
"""

from veil.mpc.protocols.beaver import beaver_product
from veil.mpc.protocols.comparison import sign
from veil.mpc.protocols.truncation import truncate

__all__ = ["beaver_product", "sign", "truncate"]
