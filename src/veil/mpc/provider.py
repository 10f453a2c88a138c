"""The crypto provider (dealer): correlated randomness for the parties, never their inputs.

The provider is a worker that takes no part in the computation. For each protocol step it
draws fresh random values from its CSPRNG (:mod:`veil.mpc._random`), computes the
correlations the protocol needs (a Beaver triple ``c = a * b``, a truncation pair, the bits
of a comparison mask), splits every value into additive shares (XOR shares for bit-level
values) and sends each party its own **bundle**: one flat int64 tensor per party, moved from
the provider's worker straight to the party's worker. Parties ``0..n-2`` get uniformly random
bundles; the last party gets ``value - sum(others)`` (or the XOR), so any ``n - 1`` bundles
are independent of the values.

**Seeded dealing.** A random bundle need not travel: with ``seeded``, the provider draws a
fresh 256-bit seed for each of parties ``0..n-2``, expands it into that party's bundle with
AES-256-CTR (:func:`veil.mpc._random.expand_seed`) to compute the last party's bundle, and
sends those parties only their seed (32 bytes), which they expand themselves. The provider's
traffic drops from ``n`` bundles to one (half, with two parties); the bundles are then
pseudorandom instead of uniform, as with any CSPRNG. The orchestration uses it when a party
or the provider is a network worker (:attr:`veil.mpc._runtime.Context.seeded`); in-process
workers move bundles for free, and expanding costs the party time.

Security model: semi-honest parties and provider, the provider colluding with no party. The
provider sees no input and no opened value; a party sees its own shares, its bundles and
values that are masked by dealer randomness unknown to it.

Every bundle layout is described by a :class:`Layout` built from the same arguments on the
provider and on the parties, so a bundle needs no header. A dealer call can produce
``count`` bundles at once (shape ``(count, L)``); parties use row ``index``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from veil._errors import ProtocolError
from veil.mpc import limbs
from veil.mpc._random import SEED_WORDS, expand_seed, random_int64, random_seed
from veil.mpc.encoding import wrap
from veil.pointers import remote_function

Shape = tuple[int, ...]


class Layout:
    """Where each named piece sits in a flat bundle: arithmetic pieces first, then XOR ones."""

    __slots__ = ("arith_len", "pieces", "total")

    def __init__(self, arith: Sequence[tuple[str, Shape]], xor: Sequence[tuple[str, Shape]] = ()):
        self.pieces: dict[str, tuple[int, int, Shape]] = {}
        pos = 0
        for name, shape in (*arith, *xor):
            numel = _numel(shape)
            self.pieces[name] = (pos, numel, tuple(shape))
            pos += numel
        self.arith_len = sum(_numel(s) for _, s in arith)
        self.total = pos

    def views(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of one bundle row by piece name, made once per row (a protocol run reads
        its row in several steps): cached on the row tensor itself, which lives in its
        party's store as long as the run needs it."""
        cached = getattr(row, "_veil_views", None)
        if cached is not None and cached[0] is self:
            return cached[1]
        self._check(row)
        out = self.unpack(row)
        row._veil_views = (self, out)
        return out

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (one bundle row, or ``(count, total)`` rows: each piece then has
        a leading ``count`` dimension) by piece name."""
        lead = tuple(flat.shape[:-1])
        return {
            name: flat[..., start : start + numel].view(lead + shape)
            for name, (start, numel, shape) in self.pieces.items()
        }

    def arrays(self, row: torch.Tensor) -> dict[str, np.ndarray]:
        """Like :meth:`views`, as NumPy views of the same memory (for the elementwise party
        steps, where NumPy's per-operation cost is a fraction of torch's)."""
        cached = getattr(row, "_veil_arrays", None)
        if cached is not None and cached[0] is self:
            return cached[1]
        self._check(row)
        flat = row.numpy()
        out = {}
        for name, (start, numel, shape) in self.pieces.items():
            piece = flat[start : start + numel]
            out[name] = piece if len(shape) == 1 else piece.reshape(shape)
        row._veil_arrays = (self, out)
        return out

    def _check(self, row: torch.Tensor) -> None:
        if row.dim() != 1 or row.shape[0] != self.total:
            raise ProtocolError(
                f"a dealer bundle row of shape {tuple(row.shape)} does not fit its layout "
                f"({self.total} words)"
            )

    def get(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The view of piece ``name`` in bundle row ``flat`` (see :meth:`views`)."""
        return self.views(flat)[name]


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_parties(n: int, count: int) -> None:
    if type(n) is not int or n < 2:
        raise ProtocolError(f"the provider needs a party count of at least 2, got {n!r}")
    if type(count) is not int or count < 1:
        raise ProtocolError(f"bundle count must be a positive int, got {count!r}")


def _check_seeded(seeded: Any) -> bool:
    if type(seeded) is not bool:
        raise ProtocolError(f"seeded must be a bool, got {seeded!r}")
    return seeded


def split_values(
    values: torch.Tensor, arith_len: int, n: int, seeded: bool = False
) -> tuple[torch.Tensor, ...]:
    """Split ``(count, L)`` dealer values into ``n`` bundles, in place: parties ``0..n-2`` get
    uniformly random bundles, the last one ``values - sum`` (columns before ``arith_len``)
    or ``values ^ xor`` (the others) of them, written over ``values``. With ``seeded``,
    parties ``0..n-2`` get the seeds of their bundles instead (see the module doc)."""
    if seeded:
        seeds = [random_seed() for _ in range(n - 1)]
        rand = [expand_seed(s, values.numel()).view(values.shape) for s in seeds]
    else:
        rand = list(random_int64((n - 1, *values.shape)).unbind(0))
    for r in rand:
        values[:, :arith_len] -= r[:, :arith_len]
        values[:, arith_len:] ^= r[:, arith_len:]
    return (*(seeds if seeded else rand), values)


def seeded_bundle(seed: torch.Tensor, count: int, total: int) -> torch.Tensor:
    """The ``(count, total)`` bundle a party expands from its seed (see the module doc)."""
    return expand_seed(seed, count * total).view(count, total)


def _bundle_meta(
    total: int, n: int, count: int, seeded: bool = False
) -> tuple[torch.Tensor, ...]:
    full = torch.empty((count, total), dtype=torch.int64, device="meta")
    seed = torch.empty(SEED_WORDS, dtype=torch.int64, device="meta")
    return (*((seed if seeded else full) for _ in range(n - 1)), full)


# ---------------------------------------------------------------------- Beaver triples


@functools.lru_cache(maxsize=4096)
def product_shape(kind: str, sx: Shape, sy: Shape, params: tuple[Any, ...]) -> Shape:
    """The shape of ``op(x, y)`` for a Beaver ``kind`` ("mul", "matmul", "conv2d", ...)."""
    x = torch.empty(sx, dtype=torch.int64, device="meta")
    y = torch.empty(sy, dtype=torch.int64, device="meta")
    return tuple(ring_product(kind, x, y, params).shape)


def ring_product(
    kind: str, x: torch.Tensor, y: torch.Tensor, params: tuple[Any, ...]
) -> torch.Tensor:
    """The bilinear map of a Beaver triple, modulo 2^64.

    Kinds: ``"mul"`` (elementwise, broadcasting), ``"matmul"`` (params: empty, or two flags
    saying which operand to transpose first), and the convolutions of :func:`convolution`.
    """
    if kind == "mul":
        return x * y
    if kind == "matmul":
        if params:  # lazily transposed matrices: (transpose x, transpose y)
            x = x.transpose(-2, -1) if params[0] else x
            y = y.transpose(-2, -1) if params[1] else y
        return limbs.matmul(x, y)
    return convolution(kind, x, y, params, limbs.conv2d)


def _conv2d(x: torch.Tensor, w: torch.Tensor, *params: Any) -> torch.Tensor:
    return F.conv2d(x, w, None, *params)


def _conv3d(x: torch.Tensor, w: torch.Tensor, *params: Any) -> torch.Tensor:
    return F.conv3d(x, w, None, *params)  # exact mod 2^64 on int64 too


def convolution(
    kind: str, x: torch.Tensor, y: torch.Tensor, params: tuple[Any, ...], conv2d: Any = _conv2d
) -> torch.Tensor:
    """A convolution kind of :func:`ring_product` (2-D or 3-D), on ring or float values.

    ``"conv2d"`` / ``"conv3d"`` (params: stride, padding, dilation, groups);
    ``"conv_transpose2d"`` / ``"conv_transpose3d"`` (params: stride, padding,
    output_padding, groups, dilation; the input gradient of a convolution); and
    ``"conv2d_weight"`` / ``"conv3d_weight"`` (``x`` the input, ``y`` the output gradient;
    params: stride, padding, dilation, kernel size; the weight gradient of an ungrouped
    convolution). ``conv2d(x, w, stride, padding, dilation, groups)`` runs the 2-D forward
    convolutions (the exact ring one for shares).
    """
    three = kind.startswith(("conv3d", "conv_transpose3d"))
    forward = _conv3d if three else conv2d
    if kind in ("conv2d", "conv3d"):
        return forward(x, y, *params)
    if kind in ("conv_transpose2d", "conv_transpose3d"):
        stride, padding, output_padding, groups, dilation = params
        transposed = F.conv_transpose3d if three else F.conv_transpose2d
        return transposed(x, y, None, stride, padding, output_padding, groups, dilation)
    if kind in ("conv2d_weight", "conv3d_weight"):
        stride, padding, dilation, kernel = params
        # d loss / d w[o, c, i, j] = sum_{n,p,q} g[n, o, p, q] * x[n, c, p*s + i*d - pad, ...]:
        # a convolution of x^T (C, N, ...) by g^T (O, N, ...) with stride and dilation
        # swapped, cropped to the kernel size.
        out = forward(x.transpose(0, 1), y.transpose(0, 1), dilation, padding, stride, 1)
        crop = (slice(None), slice(None), *(slice(0, k) for k in kernel))
        return out[crop].transpose(0, 1)
    raise ProtocolError(f"unknown product kind {kind!r}")


@functools.lru_cache(maxsize=4096)
def beaver_layout(kind: str, sx: Shape, sy: Shape, params: tuple[Any, ...], trunc: int) -> Layout:
    """Bundle of a Beaver triple ``(a, b, c = op(a, b))``, then a truncation pair if ``trunc``."""
    sz = product_shape(kind, sx, sy, params)
    pieces = [("a", sx), ("b", sy), ("c", sz)]
    if trunc:
        pieces += [("r", sz), ("r_hi", sz), ("msb", sz)]
    return Layout(pieces)


@functools.lru_cache(maxsize=4096)
def trunc_layout(shape: Shape) -> Layout:
    """Bundle of a truncation pair: ``r``, ``r >>> bits`` and ``r >>> 63`` (all arithmetic)."""
    return Layout([("r", shape), ("r_hi", shape), ("msb", shape)])


def _check_bits(bits: int) -> None:
    if type(bits) is not int or not 1 <= bits <= 60:
        raise ProtocolError(f"truncation bits must be an int in [1, 60], got {bits!r}")


def _deal_beaver_meta(
    kind: str, sx: Shape, sy: Shape, params: tuple[Any, ...], trunc: int, n: int, count: int,
    seeded: bool = False,
) -> tuple[torch.Tensor, ...]:
    return _bundle_meta(
        beaver_layout(kind, tuple(sx), tuple(sy), tuple(params), trunc).total, n, count, seeded
    )


@remote_function("mpc.deal_beaver", meta=_deal_beaver_meta)
def deal_beaver(
    kind: str, sx: Shape, sy: Shape, params: tuple[Any, ...], trunc: int, n: int, count: int,
    seeded: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``count`` Beaver triples ``a, b, c = op(a, b)`` for ``n`` parties (dealer side).

    With ``trunc > 0`` each bundle also holds a truncation pair for the product (see
    :func:`veil.mpc.protocols.truncation.truncate`). ``seeded``: see :func:`split_values`.
    """
    _check_parties(n, count)
    if trunc:
        _check_bits(trunc)
    sx, sy, params = tuple(sx), tuple(sy), tuple(params)
    lay = beaver_layout(kind, sx, sy, params, trunc)
    values = random_int64((count, lay.total))  # a, b (and r) stay uniformly random
    p = lay.unpack(values)  # every piece with a leading dimension of count rows
    c = _rows_product(kind, p["a"], p["b"], params, len(product_shape(kind, sx, sy, params)))
    if c is not None:
        p["c"].copy_(c)
    else:
        for k in range(count):
            p["c"][k].copy_(ring_product(kind, p["a"][k], p["b"][k], params))
    if trunc:
        _trunc_fill(p, trunc)
    return split_values(values, lay.arith_len, n, _check_seeded(seeded))


def _rows_product(
    kind: str, a: torch.Tensor, b: torch.Tensor, params: tuple[Any, ...], ndim: int
) -> torch.Tensor | None:
    """``ring_product`` of every row's ``a`` and ``b`` at once (leading row dimension), or
    None for the kinds this does not batch (convolutions, non-matrix matmuls): one call per
    request instead of one per row. Exact, so the same values as row by row."""
    count = a.shape[0]
    if kind == "mul":  # align each operand's dimensions to the product's, after the rows
        a = a.view(count, *([1] * (ndim - a.dim() + 1)), *a.shape[1:])
        b = b.view(count, *([1] * (ndim - b.dim() + 1)), *b.shape[1:])
    elif not (kind == "matmul" and a.dim() == 3 and b.dim() == 3):  # rows of 2-D matrices
        return None
    return ring_product(kind, a, b, params)


def _trunc_fill(p: dict[str, torch.Tensor], bits: int) -> None:
    """Fill ``r_hi = r >>> bits`` and ``msb = r >>> 63`` from the random ``r``, in place."""
    r = p["r"]
    torch.bitwise_and(r >> bits, wrap((1 << (64 - bits)) - 1), out=p["r_hi"])
    torch.bitwise_and(r >> 63, 1, out=p["msb"])


def _deal_trunc_meta(
    shape: Shape, bits: int, n: int, count: int, seeded: bool = False
) -> tuple[torch.Tensor, ...]:
    return _bundle_meta(trunc_layout(tuple(shape)).total, n, count, seeded)


@remote_function("mpc.deal_trunc", meta=_deal_trunc_meta)
def deal_trunc(
    shape: Shape, bits: int, n: int, count: int, seeded: bool = False
) -> tuple[torch.Tensor, ...]:
    """``count`` truncation pairs (``r``, ``r >>> bits``, ``msb(r)``) for ``n`` parties
    (``seeded``: see :func:`split_values`)."""
    _check_parties(n, count)
    _check_bits(bits)
    lay = trunc_layout(tuple(shape))
    values = random_int64((count, lay.total))
    _trunc_fill(lay.unpack(values), bits)
    return split_values(values, lay.arith_len, n, _check_seeded(seeded))


# ---------------------------------------------------------------------- comparison material

#: Number of levels of the carry tree after the free first level (blocks of 2 -> 64 bits).
AND_LEVELS = 5
#: Values per word at the last tree level: level ``L`` packs ``2^L`` values in each word.
PACK = 1 << AND_LEVELS


#: Comparisons of at most this many values open their carry tree's last level straight into
#: arithmetic shares (one round fewer, about six more dealt words per value for ReLU: see
#: :mod:`veil.mpc.protocols.comparison`); larger ones, where the material's volume costs
#: more than a round, convert the final bit in a round of its own. Measured: in process the
#: two cost the same for the paper's MLP (ReLUs of 256 and 192 values) and the fused one
#: 10% more at 4096 values; over a network the saved rounds take a training step of that
#: MLP on three worker processes from 30.9 to 28.2 ms.
FUSED_MAX = 4096

#: Arithmetic pieces of the fused last level: the bits of its masks ``la``, ``lb``, ``lg``
#: and the product ``la * lb``.
_FUSED_BITS = ("ga", "gb", "gab", "gg")


def fused(numel: int) -> bool:
    """Whether a comparison of ``numel`` values uses the fused last level."""
    return numel <= FUSED_MAX


def packed_len(numel: int) -> int:
    """``numel`` rounded up to a multiple of :data:`PACK` (padding values are discarded)."""
    return -(-numel // PACK) * PACK


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bits of ``packed_len`` values (int64 0/1, the last dimension) packed 32 a word: value
    ``32k + s`` at bit ``s`` of word ``k`` (the order of the carry tree's last level)."""
    lanes = torch.arange(PACK, dtype=torch.int64, device=bits.device)
    return (bits.view(*bits.shape[:-1], -1, PACK) << lanes).sum(-1)


@functools.lru_cache(maxsize=4096)
def sign_layout(numel: int, relu: bool) -> Layout:
    """Bundle of one batched sign (comparison with zero) of ``numel`` values.

    Arithmetic: the mask ``r``, ``R = r >>> 62``, ``msb = r >>> 63``, a random bit ``rho``;
    with ``relu``, a mask ``alpha`` for the input and the products ``alpha * R``,
    ``alpha * msb``, ``alpha * rho``. XOR (bit-sliced words, ``N = packed_len(numel)``):
    ``r' = r mod 2^62`` and ``m = r' & (r' >> 1)`` (one word per value; ``m`` lets the
    parties skip the first level of the carry tree), then per tree level ``L`` (whose words
    hold ``2^L`` values each, ``N / 2^L`` words) one AND triple with a shared first operand:
    ``a`` (one row), ``b`` and ``c = a & b`` (two rows, one for ``G`` and one for ``P``; one
    row at the last level), and ``rho`` again, packed 32 values a word.

    When :func:`fused`, the last level has no triple and there is no ``rho``: instead three
    random bits per value mask that level's inputs, ``la``, ``lb`` and ``lg`` (XOR, packed
    32 values a word), and their arithmetic forms come as ``ga``, ``gb``, ``gg``, with
    ``gab = ga * gb`` (and, for ReLU, each times ``alpha``: ``alpha_ga``, ...).
    """
    n = (numel,)
    words = packed_len(numel)
    fuse = fused(numel)
    bits = _FUSED_BITS if fuse else ("rho_a",)
    arith = [("r", n), ("R", n), ("msb", n)] + [(name, n) for name in bits]
    if relu:
        arith += [("alpha", n), ("alpha_R", n), ("alpha_msb", n)]
        arith += [(alpha_name(name), n) for name in bits]
    xor: list[tuple[str, Shape]] = [("rp", (words,)), ("m", (words,))]
    for level in range(1, AND_LEVELS + 1):
        w = words >> level
        if level < AND_LEVELS:
            xor += [(f"a{level}", (w,)), (f"b{level}", (2, w)), (f"c{level}", (2, w))]
        elif fuse:
            xor += [("la", (w,)), ("lb", (w,)), ("lg", (w,))]
        else:
            xor += [(f"a{level}", (w,)), (f"b{level}", (1, w)), (f"c{level}", (1, w))]
    if not fuse:
        xor.append(("rho_x", (words >> AND_LEVELS,)))
    return Layout(arith, xor)


def alpha_name(name: str) -> str:
    """The name of the piece ``alpha * name`` of a ReLU bundle."""
    return "alpha_rho" if name == "rho_a" else f"alpha_{name}"


def _deal_sign_meta(
    numel: int, relu: bool, n: int, count: int, seeded: bool = False
) -> tuple[torch.Tensor, ...]:
    return _bundle_meta(sign_layout(numel, relu).total, n, count, seeded)


def _sign_values(lay: Layout, flat: torch.Tensor, numel: int, relu: bool) -> None:
    """Turn uniformly random ``(count, total)`` bundle rows into comparison material, in
    place (every piece below has a leading dimension of rows)."""
    p = lay.unpack(flat)
    r = p["r"]
    torch.bitwise_and(r >> 62, 3, out=p["R"])
    torch.bitwise_and(r >> 63, 1, out=p["msb"])
    fuse = fused(numel)
    if fuse:
        for name in ("ga", "gb", "gg"):
            p[name].bitwise_and_(1)
        torch.mul(p["ga"], p["gb"], out=p["gab"])
        names: tuple[str, ...] = _FUSED_BITS
    else:
        p["rho_a"].bitwise_and_(1)
        names = ("rho_a",)
    if relu:
        alpha = p["alpha"]
        torch.mul(alpha, p["R"], out=p["alpha_R"])
        torch.mul(alpha, p["msb"], out=p["alpha_msb"])
        for name in names:
            torch.mul(alpha, p[name], out=p[alpha_name(name)])
    rp = p["rp"]
    rp[:, :numel] = r  # padding values keep their random r'
    rp &= (1 << 62) - 1
    torch.bitwise_and(rp, rp >> 1, out=p["m"])
    for level in range(1, AND_LEVELS if fuse else AND_LEVELS + 1):
        b = p[f"b{level}"]  # (rows, 2 or 1, words): both rows share the first operand
        torch.bitwise_and(b, p[f"a{level}"].unsqueeze(1), out=p[f"c{level}"])
    bits = torch.zeros(flat.shape[0], packed_len(numel), dtype=torch.int64)
    packed = (("ga", "la"), ("gb", "lb"), ("gg", "lg")) if fuse else (("rho_a", "rho_x"),)
    for src, dst in packed:
        bits[:, :numel] = p[src]
        p[dst].copy_(pack_bits(bits))


@remote_function("mpc.deal_sign", meta=_deal_sign_meta)
def deal_sign(
    numel: int, relu: bool, n: int, count: int, seeded: bool = False
) -> tuple[torch.Tensor, ...]:
    """``count`` bundles of comparison material for ``numel`` values and ``n`` parties
    (``seeded``: see :func:`split_values`)."""
    _check_parties(n, count)
    if type(numel) is not int or numel < 1:
        raise ProtocolError(f"numel must be a positive int, got {numel!r}")
    lay = sign_layout(numel, relu)
    values = random_int64((count, lay.total))
    _sign_values(lay, values, numel, relu)
    return split_values(values, lay.arith_len, n, _check_seeded(seeded))


__all__ = [
    "AND_LEVELS",
    "FUSED_MAX",
    "PACK",
    "Layout",
    "alpha_name",
    "beaver_layout",
    "deal_beaver",
    "deal_sign",
    "deal_trunc",
    "fused",
    "pack_bits",
    "packed_len",
    "product_shape",
    "ring_product",
    "seeded_bundle",
    "sign_layout",
    "split_values",
    "trunc_layout",
]
