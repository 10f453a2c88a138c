"""Secure multiparty computation: fixed-point encoding, additive secret sharing, SPDZ-style
protocols with a crypto provider, and torch integration at the aten level.

The chain (see DESIGN.md, section 2)::

    x.fix_precision()                       FixedPrecisionTensor (float outside, int64 inside)
     .share(alice, bob, crypto_provider=c)  AdditiveSharingTensor child, one share per party
                                            (each a PointerTensor on its party's worker)

    s = torch.tensor([0.5, -1.25]).fix_precision().share(alice, bob, crypto_provider=carol)
    (s * s + s).sum().get().float_precision()

    model = nn.Linear(13, 1).fix_precision().share(alice, bob, crypto_provider=carol)

Parties may also be plain names (``.share("p0", "p1", crypto_provider="dealer")``): the
shares are then local tensors, an in-process simulation of the same protocols.
"""

# The _ops_* modules register their aten handlers (``@OPS.implements``) when imported; their
# names stay private (``__all__`` is the public surface).
from veil.mpc import (  # noqa: F401
    _methods,
    _ops_attention,
    _ops_combine,
    _ops_conv,
    _ops_distance,
    _ops_embedding,
    _ops_fixed,
    _ops_logical,
    _ops_losses,
    _ops_nn,
    _ops_pool,
    _ops_resample,
    _ops_rnn,
    _ops_scatter,
    _ops_shared,
    _ops_sort,
    _ops_stats,
    approximations,
    limbs,
)
from veil.mpc._module import (
    fix_precision_module,
    float_precision_module,
    get_module,
    share_module,
)
from veil.mpc._runtime import STATS, Context, Stats, context
from veil.mpc.encoding import DEFAULT_PRECISION, decode, encode
from veil.mpc.fixed import FixedPrecisionTensor, fix_precision
from veil.mpc.sharing import AdditiveSharingTensor, reconstruct, refresh, share

_methods.install()


def stats() -> Stats:
    """The process-wide communication counters (rounds, bytes) of secure computations."""
    return STATS


def supported_ops() -> dict[str, list[str]]:
    """The aten operations each encoding implements.

    A FixedPrecisionTensor also runs any other op that torch decomposes into these
    (``torch._decomp``: ``layer_norm``, ``batch_norm``, ``leaky_relu``, ``silu``, ``elu``,
    ``hardswish``, ``smooth_l1_loss``, ...); an op whose decomposition needs a missing step
    raises ``NotImplementedError`` naming both.
    """
    from veil.mpc import fixed, sharing

    return {"FixedPrecisionTensor": fixed.OPS.names(), "AdditiveSharingTensor": sharing.OPS.names()}


__all__ = [
    "DEFAULT_PRECISION",
    "AdditiveSharingTensor",
    "Context",
    "FixedPrecisionTensor",
    "Stats",
    "approximations",
    "context",
    "decode",
    "encode",
    "fix_precision",
    "fix_precision_module",
    "float_precision_module",
    "get_module",
    "limbs",
    "reconstruct",
    "refresh",
    "share",
    "share_module",
    "stats",
    "supported_ops",
]
