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
   the five other levels each use one batched AND with a binary Beaver triple (one round).
   Bits of other lanes are garbage by design and never leave a party unmasked.
4. **Bit to arithmetic.** With a random bit ``rho`` dealt in both forms, the parties open
   ``e = b ^ rho`` (lane 0 only) and take ``[b] = e + [rho] - 2e[rho]``.

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
from veil.mpc.provider import AND_LEVELS, deal_sign, sign_layout
from veil.pointers import remote_function

_LOW62 = (1 << 62) - 1


def _and_masks(
    lay: Any, row: torch.Tensor, level: int, g: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked AND inputs for carry-tree ``level`` and the state (``G`` shifted) to keep."""
    shift = 1 << level
    ps = p >> shift
    gs = g >> shift
    if level < AND_LEVELS:
        x = torch.stack((ps, ps))
        y = torch.stack((g, p))
    else:
        x = ps.unsqueeze(0)
        y = g.unsqueeze(0)
    msg = torch.cat(
        ((x ^ lay.get(row, f"a{level}")).reshape(-1), (y ^ lay.get(row, f"b{level}")).reshape(-1))
    )
    return gs, msg


def _and_finish(
    i: int,
    lay: Any,
    row: torch.Tensor,
    level: int,
    msg: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """This party's XOR share of the batched AND of carry-tree ``level``."""
    both = opened(msg, parts, xor=True)
    a = lay.get(row, f"a{level}")
    half = a.numel()
    d = both[:half].view(a.shape)
    e = both[half:].view(a.shape)
    z = lay.get(row, f"c{level}") ^ (d & lay.get(row, f"b{level}")) ^ (e & a)
    if i == 0:
        z = z ^ (d & e)
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
    c = public[:numel]
    cb = ~(c & _LOW62)  # NOT c'; lanes 62 and 63 are 1, where r' is 0: "equal"
    cb_hi = cb >> 1
    rho = lay.get(row, "rp")  # this party's XOR share of r'
    rho_hi = rho >> 1
    mu = lay.get(row, "m")  # share of r' & (r' >> 1)
    # Blocks of two bits (lo = lane j, hi = lane j + 1): eq = r ^ ~c, lt = r & ~c.
    p = mu ^ (cb & rho_hi) ^ (cb_hi & rho)
    if i == 0:
        p = p ^ (cb_hi & cb)
    g = (cb_hi & rho_hi) ^ (cb & (mu ^ (cb_hi & rho)))
    state, out = _and_masks(lay, row, 1, g, p)
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
    z = _and_finish(i, lay, row, level - 1, msg, parts)
    g = state ^ z[0]
    p = z[1]
    state, out = _and_masks(lay, row, level, g, p)
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
    """Finish the last AND; send lane 0 of ``b ^ rho`` (the other lanes are never sent)."""
    lay = sign_layout(numel, relu)
    z = _and_finish(i, lay, row, AND_LEVELS, msg, parts)
    out = (state ^ z[0] ^ lay.get(row, "rho_x")) & 1
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
    e = opened(msg, parts, xor=True) & 1
    c = public[:numel]
    big_c = (c >> 62) & 3
    w = (c >= 0).to(torch.int64)  # c < 2^63 as an unsigned number
    big_r, msb, rho = lay.get(row, "R"), lay.get(row, "msb"), lay.get(row, "rho_a")
    flip = 1 - 2 * e
    s = 4 * w * msb - big_r - rho * flip
    if i == 0:
        s = s + big_c - e
    if not relu:
        return s.view(x.shape)
    eps = public[numel:]
    flat = x.reshape(-1)
    x_r = eps * big_r + lay.get(row, "alpha_R")
    x_msb = eps * msb + lay.get(row, "alpha_msb")
    x_rho = eps * rho + lay.get(row, "alpha_rho")
    y = big_c * flat - x_r + 4 * w * x_msb - e * flat - flip * x_rho
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
