"""Secure comparison with zero (the sign bit) and ReLU, dealer-assisted, for any ``n``.

Protocol ``sign(x)`` for ``|x| < 2^62`` (ring units), giving shares of ``[x >= 0]``:

1. **Mask and open.** The provider draws ``r`` uniform in Z_2^64 and deals arithmetic
   shares of ``r``, ``R = floor(r / 2^62)`` and ``msb(r)``, plus XOR shares of the bits of
   ``r' = r mod 2^62`` packed in one int64 word per value. The parties open
   ``c = u + r`` with ``u = x + 2^62`` in ``[0, 2^63)``; ``c`` is uniform.
2. **Reduce to a comparison of public and shared bits.** Writing
   ``c = C * 2^62 + c'`` and ``r = R * 2^62 + r'``:
   ``[x >= 0] = floor(u / 2^62) = C - R + 4w - b`` where ``w = [c < 2^63] * msb(r)`` is
   whether ``u + r`` wrapped (local: public bit times shared bit; ``u < 2^63`` makes the
   wrap visible in ``msb(r)``) and ``b = [c' < r']`` is the borrow of the low 62 bits.
3. **Borrow circuit.** ``b`` is computed on the XOR-shared bits of ``r'`` with ``c'``
   public, by a carry-lookahead tree over the 64 bit lanes of each word: each block has
   ``G`` ("``r' > c'`` is decided in this block") and ``P`` ("equal in this block"),
   combined as ``G = G_hi ^ (P_hi & G_lo)``, ``P = P_hi & P_lo``. The first level (blocks
   of 2 bits) is free because the provider also deals the XOR shares of ``r' & (r' >> 1)``;
   the five other levels each use one batched AND with a binary Beaver triple (one round),
   whose first operand ``P_hi`` is masked once for both products. Level ``L`` only needs
   the lanes at multiples of ``2^L``, so before it the parties **pack** ``2^L`` values into
   each word (value ``s`` of a group in lanes ``= s mod 2^L``; a local, linear bit
   shuffle of XOR shares): the words, triples and messages halve at every level (about
   ``1.9`` words per value in all instead of ``9``). Lanes a value does not need are
   garbage by design and never leave a party unmasked.
4. **Bit to arithmetic.** With a random bit ``rho`` dealt in both forms (the XOR form
   packed like the last level), the parties open ``e = b ^ rho`` (the 32 result lanes of
   each word only) and take ``[b] = e + [rho] - 2e[rho]``.

   For at most :data:`~veil.mpc.provider.FUSED_MAX` values this round is merged with the
   last AND (``b = G_hi ^ (P_hi & G_lo)``). ``G_hi`` ("decided in the high half") and
   ``P_hi`` ("equal in the high half") exclude each other, so as integers
   ``b = G_hi + P_hi * G_lo``. The provider deals three random bits ``la``, ``lb``, ``lg``
   per value in both forms, and the arithmetic product ``la * lb``. The parties open
   ``d = P_hi ^ la``, ``e = G_lo ^ lb`` and ``h = G_hi ^ lg`` in one round (the 32 value
   lanes of each word only) and, writing each bit ``u ^ v`` as ``u + (1 - 2u) v``, take
   ``[b] = h + de + (1 - 2h)[lg] + d(1 - 2e)[lb] + e(1 - 2d)[la]
   + (1 - 2d)(1 - 2e)[la lb]``, which is local. Larger batches keep the separate round:
   there the four arithmetic bits (eight for ReLU) cost more than the round saves.

``relu(x) = x * [x >= 0]`` costs no extra round: in step 1 the parties also open
``eps = x - alpha`` for a dealer mask ``alpha``; the provider also dealt ``alpha * R``,
``alpha * msb(r)`` and ``alpha`` times each dealt bit of step 4, so every product of ``x``
with a dealer value is ``eps * v + alpha * v``, and the products with public values are
local.

Exact (no approximation, no failure probability) for ``|x| < 2^62``. Six rounds up to
``FUSED_MAX`` values, seven above. The provider sees nothing; the parties see only
uniformly masked values. Security model: see :mod:`veil.mpc.provider`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from veil.mpc._runtime import Context, exchange, material
from veil.mpc.provider import (
    AND_LEVELS,
    PACK,
    alpha_name,
    deal_sign,
    fused,
    packed_len,
    sign_layout,
)
from veil.pointers import remote_function

_LOW62 = (1 << 62) - 1
_LOW32 = (1 << 32) - 1
_LANES = np.arange(PACK, dtype=np.int64)

#: Lanes kept when packing for level ``L``: those with ``lane mod 2^L < 2^(L-1)``.
_PACK_MASKS = {
    1: 0x5555555555555555,
    2: 0x3333333333333333,
    3: 0x0F0F0F0F0F0F0F0F,
    4: 0x00FF00FF00FF00FF,
    5: 0x0000FFFF0000FFFF,
}

# The party steps compute on NumPy views of their int64 tensors (same wrapping int64
# arithmetic, bit for bit): the values are small and the steps are dozens of elementwise
# operations, where NumPy costs a fraction of torch's per-operation overhead. The messages
# received (``parts``) come last, flat, so that a step is a plain command of pointers.


def _opened(own: torch.Tensor, parts: tuple[torch.Tensor, ...], xor: bool) -> np.ndarray:
    """The value opened by a party (as :func:`veil.mpc._runtime.opened`), as an array."""
    out = own.numpy()
    for p in parts:
        out = (out ^ p.numpy()) if xor else (out + p.numpy())
    return out


def _pack(gp: np.ndarray, level: int) -> np.ndarray:
    """Pack pairs of adjacent words for tree ``level``: ``(rows, M)`` -> ``(rows, M / 2)``.

    The words hold ``2^(level-1)`` values each, valid in lanes ``j + s`` (``j`` a multiple
    of ``2^level``, ``s < 2^(level-1)`` the value's slot); the second word of each pair
    moves to slots ``2^(level-1)..``. Linear over XOR shares: each party packs its own.
    """
    v = gp.reshape(gp.shape[0], -1, 2) & _PACK_MASKS[level]
    return v[..., 0] ^ (v[..., 1] << (1 << (level - 1)))


def _and_masks(p: dict[str, np.ndarray], level: int, gp: np.ndarray) -> tuple[Any, Any]:
    """Masked AND inputs for carry-tree ``level``: what the party keeps (the state
    ``G_hi``, then the message) and the message it sends.

    ``gp`` holds the packed ``G`` and ``P`` rows. The message is ``P_hi ^ a`` then
    ``(G, P) ^ b`` (only ``G`` at the last level), flattened.
    """
    hi = gp >> (1 << level)
    b = p[f"b{level}"]
    rows, words = b.shape
    msg = np.empty((rows + 1, words), dtype=np.int64)
    np.bitwise_xor(hi[1], p[f"a{level}"], out=msg[0])
    np.bitwise_xor(gp[:rows], b, out=msg[1:])
    msg = msg.reshape(-1)
    return torch.from_numpy(np.concatenate((hi[0], msg))), torch.from_numpy(msg)


def _last_masks(p: dict[str, np.ndarray], gp: np.ndarray) -> torch.Tensor:
    """The fused last level's message (see the module doc): ``P_hi ^ la``, ``G_lo ^ lb``
    and ``G_hi ^ lg``, the 32 value lanes of each packed word only."""
    hi = gp >> (1 << AND_LEVELS)
    msg = np.empty((3, gp.shape[1]), dtype=np.int64)
    np.bitwise_xor(hi[1], p["la"], out=msg[0])
    np.bitwise_xor(gp[0], p["lb"], out=msg[1])
    np.bitwise_xor(hi[0], p["lg"], out=msg[2])
    msg &= _LOW32
    return torch.from_numpy(msg.reshape(-1))


def _and_finish(
    i: int, p: dict[str, np.ndarray], level: int, keep: torch.Tensor, parts: tuple[Any, ...]
) -> np.ndarray:
    """This party's XOR shares of the new ``(G, P)`` rows (``G`` only at the last level),
    from what it kept at ``level`` (state, then its message) and the messages received."""
    a = p[f"a{level}"]
    b = p[f"b{level}"]
    rows, words = b.shape
    kept = keep.numpy()
    both = kept[words:]
    for m in parts:
        both = both ^ m.numpy()
    both = both.reshape(rows + 1, words)
    d, e = both[0], both[1:]
    z = p[f"c{level}"] ^ (e & a)
    z ^= b & d
    if i == 0:
        z ^= e & d
    z[0] ^= kept[:words]
    return z


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int64, device="meta")


def _open_meta(
    i: int, x: torch.Tensor, row: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out = _meta(x.numel() * (2 if relu else 1))
    return out, out


@remote_function("mpc.sign_open", meta=_open_meta)
def sign_open(
    i: int, x: torch.Tensor, row: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``x_i + r_i`` (party 0 adds 2^62), and ``x_i - alpha_i`` for ReLU."""
    n = x.numel()
    p = sign_layout(n, relu).arrays(row)
    flat = x.reshape(-1).numpy()
    if relu:
        masked = np.empty(2 * n, dtype=np.int64)
        np.add(flat, p["r"], out=masked[:n])
        np.subtract(flat, p["alpha"], out=masked[n:])
    else:
        masked = flat + p["r"]
    if i == 0:
        masked[:n] += 1 << 62
    out = torch.from_numpy(masked)
    return out, out


def _start_meta(
    i: int, msg: torch.Tensor, row: torch.Tensor, numel: int, relu: bool, *parts: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    w = packed_len(numel) >> 1
    return _meta(*msg.shape), _meta(4 * w), _meta(3 * w)


@remote_function("mpc.sign_tree_start", meta=_start_meta)
def sign_tree_start(
    i: int, msg: torch.Tensor, row: torch.Tensor, numel: int, relu: bool, *parts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2: open ``c`` (and ``eps``), evaluate the free first tree level, mask level 1.

    ``parts``: the messages received. Returns ``(public, keep, msg)``: the opened values,
    what the party keeps (its tree state, then its AND message) and the message it sends.
    """
    p = sign_layout(numel, relu).arrays(row)
    public = _opened(msg, parts, False)
    words = packed_len(numel)
    c = public[:numel] & _LOW62
    if words > numel:
        c = np.concatenate((c, np.zeros(words - numel, dtype=np.int64)))
    cb = ~c  # NOT c'; lanes 62 and 63 are 1, where r' is 0: "equal"
    cb_hi = cb >> 1
    rho = p["rp"]  # this party's XOR share of r'
    mu = p["m"]  # share of r' & (r' >> 1)
    # Blocks of two bits (lo = lane j, hi = lane j + 1): eq = r ^ ~c, lt = r & ~c.
    mt = mu ^ (cb_hi & rho)
    gp = np.empty((2, words), dtype=np.int64)
    rho_hi = rho >> 1
    np.bitwise_and(cb_hi, rho_hi, out=gp[0])
    gp[0] ^= cb & mt
    np.bitwise_and(cb, rho_hi, out=gp[1])
    gp[1] ^= mt
    if i == 0:
        gp[1] ^= cb_hi & cb
    keep, out = _and_masks(p, 1, _pack(gp, 1))
    return torch.from_numpy(public), keep, out


def _level_meta(
    i: int, level: int, keep: torch.Tensor, row: torch.Tensor, numel: int, relu: bool,
    *parts: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    w = packed_len(numel) >> level
    if level == AND_LEVELS and fused(numel):
        return _meta(3 * w), _meta(3 * w)
    m = (3 if level < AND_LEVELS else 2) * w
    return _meta(w + m), _meta(m)


@remote_function("mpc.sign_tree_level", meta=_level_meta)
def sign_tree_level(
    i: int, level: int, keep: torch.Tensor, row: torch.Tensor, numel: int, relu: bool,
    *parts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3..: finish the AND of ``level - 1`` and mask the AND of ``level`` (or, at a
    fused last level, its three inputs); returns what the party keeps and the message it
    sends."""
    p = sign_layout(numel, relu).arrays(row)
    z = _and_finish(i, p, level - 1, keep, parts)
    if level == AND_LEVELS and fused(numel):
        msg = _last_masks(p, _pack(z, level))
        return msg, msg
    return _and_masks(p, level, _pack(z, level))


def _arith_meta(
    i: int, keep: torch.Tensor, row: torch.Tensor, numel: int, relu: bool, *parts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out = _meta(packed_len(numel) >> AND_LEVELS)
    return out, out


@remote_function("mpc.sign_to_arith", meta=_arith_meta)
def sign_to_arith(
    i: int, keep: torch.Tensor, row: torch.Tensor, numel: int, relu: bool, *parts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish the last AND; send ``b ^ rho`` (the 32 result lanes of each packed word; the
    other lanes are never sent)."""
    p = sign_layout(numel, relu).arrays(row)
    z = _and_finish(i, p, AND_LEVELS, keep, parts)
    out = torch.from_numpy((z[0] ^ p["rho_x"]) & _LOW32)
    return out, out


def _finish_meta(
    i: int,
    x: torch.Tensor,
    public: torch.Tensor,
    msg: torch.Tensor,
    row: torch.Tensor,
    relu: bool,
    *parts: torch.Tensor,
) -> Any:
    out = _meta(*x.shape)
    return (out, _meta(*x.shape)) if relu else out


@remote_function("mpc.sign_finish", meta=_finish_meta)
def sign_finish(
    i: int,
    x: torch.Tensor,
    public: torch.Tensor,
    msg: torch.Tensor,
    row: torch.Tensor,
    relu: bool,
    *parts: torch.Tensor,
) -> Any:
    """Last step: shares of ``[x >= 0]`` (and of ``relu(x)``), shaped like ``x``.

    ``msg``: what the party sent last (``b ^ rho``, or the fused last level's message)."""
    numel = x.numel()
    p = sign_layout(numel, relu).arrays(row)
    # The opened bits, unpacked (value 32k + s at bit s of word k: provider.pack_bits).
    words = _opened(msg, parts, True).reshape(-1, packed_len(numel) // PACK)
    bits = ((words[:, :, None] >> _LANES) & 1).reshape(words.shape[0], -1)[:, :numel]
    # b = pub + sum(k_v * v) over dealt bits v: a public part and public coefficients
    if fused(numel):
        d, e, h = bits  # P_hi ^ la, G_lo ^ lb, G_hi ^ lg
        nd, ne = 1 - 2 * d, 1 - 2 * e
        pub_b = h + d * e  # b = G_hi + P_hi G_lo, each bit (u ^ v) = u + (1 - 2u) v
        terms = (("gg", 1 - 2 * h), ("gb", d * ne), ("ga", e * nd), ("gab", nd * ne))
    else:
        (e,) = bits  # b ^ rho
        pub_b = e
        terms = (("rho_a", 1 - 2 * e),)
    pub = public.numpy()
    c = pub[:numel]
    w4 = (c >= 0).astype(np.int64) << 2  # 4 * [c < 2^63 as an unsigned number]
    ce = (c >> 62) & 3  # public C - pub_b
    ce -= pub_b
    big_r, msb = p["R"], p["msb"]
    s = w4 * msb
    s -= big_r
    for name, k in terms:
        s -= k * p[name]
    if i == 0:
        s += ce
    shape = x.shape
    if not relu:
        return torch.from_numpy(s).view(shape)
    # relu(x) = (C - pub_b) x - x R + 4 w x msb - sum(k_v x v), each product x * v with a
    # dealer value v as eps * v + [alpha * v].
    eps = pub[numel:]
    y = ce * x.reshape(-1).numpy()
    t = eps * msb
    t += p["alpha_msb"]
    t *= w4
    y += t
    t = eps * big_r
    t += p["alpha_R"]
    y -= t
    for name, k in terms:
        t = eps * p[name]
        t += p[alpha_name(name)]
        t *= k
        y -= t
    return torch.from_numpy(s).view(shape), torch.from_numpy(y).view(shape)


def sign(ctx: Context, xs: list[Any], relu: bool = False) -> Any:
    """Shares of ``[x >= 0]`` (int64 0/1), and of ``relu(x)`` if ``relu``: see module doc."""
    n = ctx.n
    numel = 1
    for s in xs[0].shape:
        numel *= s
    lay = sign_layout(numel, relu)
    what = "a comparison" if not relu else "relu"
    bundles = material(ctx, what, deal_sign, (numel, relu), lay.total)
    msgs = [sign_open(i, xs[i], bundles[i], relu) for i in range(n)]
    parts = exchange(ctx, [m[1] for m in msgs])
    steps = [sign_tree_start(i, msgs[i][0], bundles[i], numel, relu, *parts[i]) for i in range(n)]
    public = [s[0] for s in steps]
    keep = [s[1] for s in steps]
    parts = exchange(ctx, [s[2] for s in steps], xor=True)
    for level in range(2, AND_LEVELS + 1):
        steps = [
            sign_tree_level(i, level, keep[i], bundles[i], numel, relu, *parts[i])
            for i in range(n)
        ]
        keep = [s[0] for s in steps]
        parts = exchange(ctx, [s[1] for s in steps], xor=True)
    if not fused(numel):
        steps = [
            sign_to_arith(i, keep[i], bundles[i], numel, relu, *parts[i]) for i in range(n)
        ]
        parts = exchange(ctx, [s[1] for s in steps], xor=True)
        keep = [s[0] for s in steps]
    outs = [
        sign_finish(i, xs[i], public[i], keep[i], bundles[i], relu, *parts[i])
        for i in range(n)
    ]
    if not relu:
        return outs
    return [o[0] for o in outs], [o[1] for o in outs]


__all__ = [
    "sign",
    "sign_finish",
    "sign_open",
    "sign_to_arith",
    "sign_tree_level",
    "sign_tree_start",
]
