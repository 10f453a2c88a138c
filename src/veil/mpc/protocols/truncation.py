"""Truncation: dividing a shared value by a public power of two, for any number of parties.

After a fixed-point product the encoding carries ``2f`` fractional bits; truncation brings
it back to ``f``. Dividing each share by ``2^f`` (the two-party trick of SecureML) is wrong
with a probability that grows with the value and fails outright for three or more parties,
so veil uses a dealer-assisted protocol that is correct for any ``n``.

Protocol ``truncate(z, s)`` (requires ``|z| < 2^61`` in the ring):

1. The provider draws ``r`` uniform in Z_2^64 and deals shares of ``r``, of
   ``r_hi = floor(r / 2^s)`` (``r`` read as unsigned) and of ``msb(r)``.
2. Each party ``i`` sends ``z_i + r_i`` (party 0 adds the public offset ``2^61``); all
   parties open ``c = u + r mod 2^64`` with ``u = z + 2^61`` in ``[0, 2^62)``. ``c`` is
   uniform: it reveals nothing about ``z``.
3. As integers ``u = c - r + w * 2^64`` where ``w`` says whether ``u + r`` wrapped. Because
   ``u < 2^62``: if ``c >= 2^62`` (unsigned) there was no wrap; otherwise the wrap happened
   exactly when ``r >= 2^63``. So ``w = [c < 2^62] * msb(r)``: public bit times shared bit,
   computed locally.
4. ``floor(u / 2^s) = floor(c / 2^s) - r_hi + w * 2^(64-s) - b`` where ``b`` in {0, 1} is
   the borrow of ``c - r`` in the low ``s`` bits. The parties drop ``b`` (computing it would
   need a comparison); party 0 adds the public terms and subtracts ``2^(61-s)`` to remove
   the offset.

Accuracy: the result is ``floor(z / 2^s) + b``, and ``b = 1`` exactly when ``u + r`` carried
out of the low ``s`` bits, which for uniform ``r`` happens with probability
``(z mod 2^s) / 2^s``: this is unbiased stochastic rounding, always strictly within one unit
of the last place of ``z / 2^s`` (one unit is ``2^-f``, 1.5e-5 for ``f = 16``). One round.

**Local truncation** (two parties only; ``share(..., truncation="local")``, the trick of
SecureML, Mohassel and Zhang 2017, and CrypTen's default for two parties). No round, no
dealer material:

1. Party 0 outputs ``floor(z_0 / 2^s)``, party 1 outputs ``-floor(-z_1 / 2^s)``, each
   reading its share as a signed 64-bit integer.

Error bound: if ``z_0 + z_1`` (as signed integers) equals ``z``, the result is
``floor(z / 2^s)`` or one more, as above (one unit of the last place at most; the low bits
of the uniform ``z_0`` make it stochastic rounding). Otherwise the sum wrapped, and the
result is off by ``2^(64-s)`` units, a failure: for a uniformly random share ``z_0`` (veil's
shares always are: they come from a split or carry dealer masks) this happens with
probability exactly ``(|z| + 1) / 2^64`` per value, independently across values and runs.
After a product of fixed-point values ``x * y`` with ``f`` fractional bits, ``|z| = |x y|
2^(2f)``: for ``f = 16`` the failure probability is ``|x y| * 2^-32`` per value, 2.3e-10 for
``|x y| = 1`` and 2.3e-7 for ``|x y| = 1000``. Use the dealer's protocol (the default) when
no failure is acceptable or with three or more parties.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from veil._errors import ProtocolError
from veil.mpc import _runtime
from veil.mpc._runtime import Context, exchange, material, opened
from veil.mpc.encoding import wrap
from veil.mpc.provider import deal_trunc, trunc_layout
from veil.pointers import remote_function

#: Public offset making the truncated value non-negative (``|z| < 2^61`` is required).
OFFSET_BITS = 61


def offset(bits: int) -> int:
    """The public value party 0 adds before opening ``z + r`` (``2^61``, for any ``bits``)."""
    return 1 << OFFSET_BITS


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mask_meta(
    i: int, x: torch.Tensor, scale: int, row: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=torch.int64, device="meta")
    return out, out


def mask_share(i: int, x: torch.Tensor, scale: int, row: torch.Tensor, bits: int) -> torch.Tensor:
    """Party step 2 on plain tensors: ``x_i * scale + r_i`` (plus the offset on party 0).

    The truncation pair is the last three pieces of ``row`` (``r``, ``r_hi``, ``msb``).
    """
    m = x.numel()
    r = row[row.shape[0] - 3 * m : row.shape[0] - 2 * m].view(x.shape)
    msg = (x * scale if scale != 1 else x) + r
    if i == 0:
        msg = msg + offset(bits)
    return msg


@functools.lru_cache(maxsize=64)
def _constants(bits: int) -> tuple[int, int, int]:
    """``2^(64-bits)`` (wrapped), the mask of the low ``64 - bits`` bits and the offset's
    share ``2^(61-bits)``: the public constants of :func:`finish_array`."""
    return wrap(1 << (64 - bits)), wrap((1 << (64 - bits)) - 1), 1 << (OFFSET_BITS - bits)


def finish_array(
    i: int, c: np.ndarray, r_hi: np.ndarray, msb: np.ndarray, bits: int
) -> np.ndarray:
    """Party steps 3-4 on flat arrays (same int64 arithmetic as torch, bit for bit): this
    party's share of ``floor(z / 2^bits)`` from the opened ``c``."""
    top, low, off = _constants(bits)
    out = np.multiply((c >> 62) == 0, msb)  # [0 <= c < 2^62] * msb: the wrap w
    out *= top
    out -= r_hi
    if i == 0:
        t = c >> bits
        t &= low
        t -= off
        out += t
    return out


def finish_share(i: int, c: torch.Tensor, row: torch.Tensor, bits: int) -> torch.Tensor:
    """Party steps 3-4 on plain tensors: this party's share of ``floor(z / 2^bits)`` from
    the opened ``c``."""
    m = c.numel()
    flat = row.numpy()
    end = flat.shape[0]
    out = finish_array(
        i, c.reshape(-1).numpy(), flat[end - 2 * m : end - m], flat[end - m :], bits
    )
    return torch.from_numpy(out).view(c.shape)


def local_array(i: int, z: np.ndarray, bits: int) -> np.ndarray:
    """Local truncation, party ``i``'s step (two parties; see the module doc): its share of
    ``z / 2^bits``, from its share ``z`` (a new array)."""
    z = np.asarray(z)
    if i == 0:
        return np.right_shift(z, bits, out=np.empty_like(z))
    out = np.negative(z, out=np.empty_like(z))
    out >>= bits
    np.negative(out, out=out)
    return out


def local_share(i: int, x: torch.Tensor, bits: int, scale: int = 1) -> torch.Tensor:
    """:func:`local_array` on a party's int64 share tensor: its share of
    ``x * scale / 2^bits`` (a new tensor shaped like ``x``)."""
    z = x.numpy()
    if scale != 1:
        z = z * scale
    return torch.from_numpy(local_array(i, z, bits))


def _local_meta(
    i: int, x: torch.Tensor, scale: int, bits: int, addend: Any = None
) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int64, device="meta")


@remote_function("mpc.trunc_local", meta=_local_meta)
def trunc_local(
    i: int,
    x: torch.Tensor,
    scale: int,
    bits: int,
    addend: torch.Tensor | None = None,
) -> torch.Tensor:
    """Party step of local truncation: this party's share of ``x * scale / 2^bits`` (plus its
    share of ``addend``).

    Raises:
        veil.ProtocolError: a party index other than 0 or 1, or ``bits`` outside 1..63.
    """
    if i not in (0, 1) or type(i) is not int:
        raise ProtocolError(f"local truncation has parties 0 and 1, got {i!r}")
    if type(bits) is not int or not 0 < bits < 64:
        raise ProtocolError(f"truncation bits must be in 1..63, got {bits!r}")
    out = local_share(i, x, bits, scale)
    return out if addend is None else out + addend


@remote_function("mpc.trunc_mask", meta=_mask_meta)
def trunc_mask(
    i: int, x: torch.Tensor, scale: int, row: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Party step: ``x_i * scale + r_i`` (plus the offset on party 0), kept and sent."""
    msg = mask_share(i, x, scale, row, bits)
    return msg, msg


@remote_function("mpc.trunc_finish")
def trunc_finish(
    i: int,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    row: torch.Tensor,
    bits: int,
    addend: torch.Tensor | None = None,
) -> torch.Tensor:
    """Party step: this party's share of ``floor(z / 2^bits)`` from the opened ``c``, plus
    its share of ``addend`` if given (fusing a following addition into this step).

    The truncation pair is the last three pieces of the bundle row (``r``, ``r_hi``, ``msb``).
    """
    out = finish_share(i, opened(msg, parts), row, bits)
    if addend is not None:
        out = out + addend
    return out


def finish(
    ctx: Context,
    keep: list[Any],
    send: list[Any],
    bundles: list[Any],
    bits: int,
    add: list[Any] | None = None,
) -> list[Any]:
    """Open ``c`` and compute the truncated shares (the second half of the protocol);
    ``add[i]`` (or None) is added to party ``i``'s result in the same step."""
    parts = exchange(ctx, send)
    add = add or [None] * ctx.n
    return [trunc_finish(i, keep[i], parts[i], bundles[i], bits, add[i]) for i in range(ctx.n)]


def truncate(
    ctx: Context, shares: list[Any], bits: int, scale: int = 1, add: list[Any] | None = None
) -> list[Any]:
    """Shares of ``x * scale / 2^bits`` rounded stochastically (see module doc); one round,
    or none with local truncation (``ctx.truncation == "local"``)."""
    if ctx.truncation == "local":
        add = add or [None] * ctx.n
        return [trunc_local(i, shares[i], scale, bits, add[i]) for i in range(ctx.n)]
    shape = tuple(shares[0].shape)
    lay = trunc_layout(shape)
    bundles = material(ctx, "truncation", deal_trunc, (shape, bits), lay.total)
    msgs = [trunc_mask(i, shares[i], scale, bundles[i], bits) for i in range(ctx.n)]
    return finish(ctx, [m[0] for m in msgs], [m[1] for m in msgs], bundles, bits, add)


__all__ = [
    "OFFSET_BITS",
    "finish",
    "finish_share",
    "local_array",
    "local_share",
    "mask_share",
    "offset",
    "trunc_finish",
    "trunc_local",
    "trunc_mask",
    "truncate",
]

_ = _runtime
