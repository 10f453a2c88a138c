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

``relu(x) = x * [x >= 0]`` costs no extra round: in step 1 the parties also open
``eps = x - alpha`` for a dealer mask ``alpha``; the provider also dealt ``alpha * R``,
``alpha * msb(r)`` and ``alpha * rho``, so every product of ``x`` with a dealer value is
``eps * v + alpha * v``, and the products with public values are local.

Exact (no approximation, no failure probability) for ``|x| < 2^62``. Seven rounds. The
provider sees nothing; the parties see only uniformly masked values. Security model: see
:mod:`veil.mpc.provider`.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc._runtime import Context, exchange, material, opened
from veil.mpc.provider import AND_LEVELS, deal_sign, packed_len, sign_layout, unpack_bits
from veil.pointers import remote_function

_LOW62 = (1 << 62) - 1
_LOW32 = (1 << 32) - 1

#: Lanes kept when packing for level ``L``: those with ``lane mod 2^L < 2^(L-1)``.
_PACK_MASKS = {
    1: 0x5555555555555555,
    2: 0x3333333333333333,
    3: 0x0F0F0F0F0F0F0F0F,
    4: 0x00FF00FF00FF00FF,
    5: 0x0000FFFF0000FFFF,
}


def _pack(gp: torch.Tensor, level: int) -> torch.Tensor:
    """Pack pairs of adjacent words for tree ``level``: ``(rows, M)`` -> ``(rows, M / 2)``.

    The words hold ``2^(level-1)`` values each, valid in lanes ``j + s`` (``j`` a multiple
    of ``2^level``, ``s < 2^(level-1)`` the value's slot); the second word of each pair
    moves to slots ``2^(level-1)..``. Linear over XOR shares: each party packs its own.
    """
    v = gp.view(gp.shape[0], -1, 2) & _PACK_MASKS[level]
    return v[..., 0] ^ (v[..., 1] << (1 << (level - 1)))


def _and_masks(
    lay: Any, row: torch.Tensor, level: int, gp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked AND inputs for carry-tree ``level`` and the state (``G_hi``) to keep.

    ``gp`` holds the packed ``G`` and ``P`` rows. The message is ``P_hi ^ a`` then
    ``(G, P) ^ b`` (only ``G`` at the last level), flattened.
    """
    hi = gp >> (1 << level)
    b = lay.get(row, f"b{level}")
    rows, words = b.shape
    msg = torch.empty((rows + 1, words), dtype=torch.int64, device=gp.device)
    torch.bitwise_xor(hi[1], lay.get(row, f"a{level}"), out=msg[0])
    torch.bitwise_xor(gp[:rows], b, out=msg[1:])
    return hi[0], msg.view(-1)


def _and_finish(
    i: int,
    lay: Any,
    row: torch.Tensor,
    level: int,
    state: torch.Tensor,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """This party's XOR shares of the new ``(G, P)`` rows (``G`` only at the last level)."""
    a = lay.get(row, f"a{level}")
    b = lay.get(row, f"b{level}")
    both = opened(msg, parts, xor=True).view(b.shape[0] + 1, b.shape[1])
    d, e = both[0], both[1:]
    z = lay.get(row, f"c{level}") ^ (e & a)
    z ^= b & d
    if i == 0:
        z ^= e & d
    z[0] ^= state
    return z


def _open_meta(
    i: int, x: torch.Tensor, row: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.numel() * (2 if relu else 1), dtype=torch.int64, device="meta")
    return out, out


@remote_function("mpc.sign_open", meta=_open_meta)
def sign_open(
    i: int, x: torch.Tensor, row: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``x_i + r_i`` (party 0 adds 2^62), and ``x_i - alpha_i`` for ReLU."""
    n = x.numel()
    lay = sign_layout(n, relu)
    flat = x.reshape(-1)
    masked = flat + lay.get(row, "r")
    if i == 0:
        masked = masked + (1 << 62)
    if relu:
        masked = torch.cat((masked, flat - lay.get(row, "alpha")))
    return masked, masked


@remote_function("mpc.sign_tree_start")
def sign_tree_start(
    i: int,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    row: torch.Tensor,
    numel: int,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2: open ``c`` (and ``eps``), evaluate the free first tree level, mask level 1.

    Returns ``(public, state, msg, msg)``: the opened values, the kept tree state and the
    AND message (kept and sent).
    """
    lay = sign_layout(numel, relu)
    public = opened(msg, parts)
    words = packed_len(numel)
    c = public[:numel] & _LOW62
    if words > numel:
        c = torch.nn.functional.pad(c, (0, words - numel))
    cb = ~c  # NOT c'; lanes 62 and 63 are 1, where r' is 0: "equal"
    cb_hi = cb >> 1
    rho = lay.get(row, "rp")  # this party's XOR share of r'
    mu = lay.get(row, "m")  # share of r' & (r' >> 1)
    # Blocks of two bits (lo = lane j, hi = lane j + 1): eq = r ^ ~c, lt = r & ~c.
    t = cb_hi & rho
    gp = torch.empty((2, words), dtype=torch.int64, device=c.device)
    rho_hi = rho >> 1
    torch.bitwise_and(cb_hi, rho_hi, out=gp[0])
    gp[0] ^= cb & (mu ^ t)
    torch.bitwise_and(cb, rho_hi, out=gp[1])
    gp[1] ^= mu ^ t
    if i == 0:
        gp[1] ^= cb_hi & cb
    state, out = _and_masks(lay, row, 1, _pack(gp, 1))
    return public, state, out, out


@remote_function("mpc.sign_tree_level")
def sign_tree_level(
    i: int,
    level: int,
    state: torch.Tensor,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    row: torch.Tensor,
    numel: int,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3..: finish the AND of ``level - 1`` and mask the AND of ``level``."""
    lay = sign_layout(numel, relu)
    z = _and_finish(i, lay, row, level - 1, state, msg, parts)
    state, out = _and_masks(lay, row, level, _pack(z, level))
    return state, out, out


@remote_function("mpc.sign_to_arith")
def sign_to_arith(
    i: int,
    state: torch.Tensor,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    row: torch.Tensor,
    numel: int,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish the last AND; send ``b ^ rho`` (the 32 result lanes of each packed word; the
    other lanes are never sent)."""
    lay = sign_layout(numel, relu)
    z = _and_finish(i, lay, row, AND_LEVELS, state, msg, parts)
    out = (z[0] ^ lay.get(row, "rho_x")) & _LOW32
    return out, out


@remote_function("mpc.sign_finish")
def sign_finish(
    i: int,
    x: torch.Tensor,
    public: torch.Tensor,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    row: torch.Tensor,
    relu: bool,
) -> Any:
    """Last step: shares of ``[x >= 0]`` (and of ``relu(x)``), shaped like ``x``."""
    numel = x.numel()
    lay = sign_layout(numel, relu)
    e = unpack_bits(opened(msg, parts, xor=True), numel)
    c = public[:numel]
    w4 = (c >= 0).to(torch.int64) << 2  # 4 * [c < 2^63 as an unsigned number]
    ce = (c >> 62) & 3  # public C - e
    ce -= e
    big_r, msb, rho = lay.get(row, "R"), lay.get(row, "msb"), lay.get(row, "rho_a")
    flip = e * -2
    flip += 1  # 1 - 2e
    s = w4 * msb
    s -= big_r
    s -= rho * flip
    if i == 0:
        s += ce
    if not relu:
        return s.view(x.shape)
    # relu(x) = (C - e) x - x R + 4 w x msb - (1 - 2e) x rho, each product x * v with a
    # dealer value v as eps * v + [alpha * v].
    eps = public[numel:]
    y = ce * x.reshape(-1)
    t = eps * msb
    t += lay.get(row, "alpha_msb")
    t *= w4
    y += t
    t = eps * big_r
    t += lay.get(row, "alpha_R")
    y -= t
    t = eps * rho
    t += lay.get(row, "alpha_rho")
    t *= flip
    y -= t
    return s.view(x.shape), y.view(x.shape)


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
    steps = [sign_tree_start(i, msgs[i][0], parts[i], bundles[i], numel, relu) for i in range(n)]
    public = [s[0] for s in steps]
    state = [s[1] for s in steps]
    keep = [s[2] for s in steps]
    parts = exchange(ctx, [s[3] for s in steps], xor=True)
    for level in range(2, AND_LEVELS + 1):
        steps = [
            sign_tree_level(i, level, state[i], keep[i], parts[i], bundles[i], numel, relu)
            for i in range(n)
        ]
        state = [s[0] for s in steps]
        keep = [s[1] for s in steps]
        parts = exchange(ctx, [s[2] for s in steps], xor=True)
    steps = [
        sign_to_arith(i, state[i], keep[i], parts[i], bundles[i], numel, relu) for i in range(n)
    ]
    parts = exchange(ctx, [s[1] for s in steps], xor=True)
    outs = [
        sign_finish(i, xs[i], public[i], steps[i][0], parts[i], bundles[i], relu) for i in range(n)
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
