"""AdditiveSharingTensor: a value of Z_2^64 split into additive shares, one per party.

``x = x_0 + x_1 + ... + x_{n-1} mod 2^64``. Each share is a plain int64 tensor (the
in-process simulation, parties named by strings) or a :class:`veil.PointerTensor` to the
share on its party's worker (the distributed protocol). Any ``n - 1`` shares are uniformly
random and independent of ``x``: shares come from an AES-CTR CSPRNG seeded by OS entropy.

Linear operations (addition, public scaling, sums, reshapes, indexing) are local to each
party. Products and comparisons run the protocols of :mod:`veil.mpc.protocols` with the
crypto provider's help. The wrapper says ``int64`` to torch; at the aten level it handles the
integer ring operations registered in :data:`OPS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from veil._errors import ProtocolError
from veil.mpc import _runtime
from veil.mpc._random import random_int64
from veil.mpc._registry import Registry
from veil.mpc._runtime import STATS, Context, context, merge, on_party
from veil.mpc.protocols import batch
from veil.pointers import PointerTensor, remote_function
from veil.pointers import send as _send

aten = torch.ops.aten

#: The aten-level operations of :class:`AdditiveSharingTensor` (integer ring semantics).
OPS = Registry("AdditiveSharingTensor")


class AdditiveSharingTensor(torch.Tensor):
    """Additive shares of an int64 (Z_2^64) tensor held by ``ctx.parties``.

    Create one with ``tensor.share(*parties, crypto_provider=provider)``. ``.get()``
    reconstructs the value (fetching one share from each party), ``.refresh()`` re-randomises
    the shares.
    """

    ctx: Context

    @staticmethod
    def __new__(
        cls, shares: list[Any], ctx: Context, transposed: bool = False
    ) -> AdditiveSharingTensor:
        if len(shares) != ctx.n:
            raise ProtocolError(f"{len(shares)} shares for {ctx.n} parties")
        return cls._make(shares[0].shape, shares, None, ctx, transposed)

    @classmethod
    def _make(
        cls,
        shape: Any,
        shares: list[Any] | None,
        pending: batch.Op | None,
        ctx: Context,
        transposed: bool,
    ) -> AdditiveSharingTensor:
        if transposed:
            shape = torch.Size((shape[1], shape[0]))
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.int64, device="cpu")
        out._shares = shares
        out._pending = pending
        out.transposed = transposed
        out.ctx = ctx
        return out

    @classmethod
    def deferred(
        cls, op: batch.Op, ctx: Context, transposed: bool = False
    ) -> AdditiveSharingTensor:
        """The result of a queued product or truncation (see :mod:`.protocols.batch`): its
        shares are computed, with everything else queued on ``ctx``, when first needed."""
        return cls._make(op.shape, None, op, ctx, transposed)

    def _resolve(self) -> None:
        self._shares = batch.result(self.ctx, self._pending)
        self._pending = None

    @property
    def pending(self) -> batch.Op | None:
        """The queued operation whose result this is, until it has run."""
        op = self._pending
        return op if op is not None and op.result is None else None

    @property
    def shares(self) -> list[Any]:
        """One share per party (a lazy transposition is applied by the parties first)."""
        if self._pending is not None:
            self._resolve()
        if self.transposed:
            self._shares = apply_each(self.ctx, "t", [(s,) for s in self._shares])
            self.transposed = False
        return self._shares

    @shares.setter
    def shares(self, value: list[Any]) -> None:
        self._shares = value
        self._pending = None
        self.transposed = False

    @property
    def raw_shares(self) -> list[Any]:
        """The shares as stored: transposed when :attr:`transposed` is set (2-D only)."""
        if self._pending is not None:
            self._resolve()
        return self._shares

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = OPS.lookup(func)(func, args, kwargs or {})
        from veil.mpc import _views  # it builds on this module

        _views.sync(func, args)  # a write into a view reaches its base, and the base's views
        return out

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        ctx = self.ctx
        provider = _runtime._name(ctx.provider) if ctx.provider is not None else None
        return (
            f"AdditiveSharingTensor(shape={tuple(self.shape)}, "
            f"parties={[_runtime._name(p) for p in ctx.parties]}, "
            f"crypto_provider={provider})"
        )

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("shared tensors cannot be pickled")

    @property
    def parties(self) -> tuple[Any, ...]:
        return self.ctx.parties

    @property
    def crypto_provider(self) -> Any:
        return self.ctx.provider

    def get(self) -> torch.Tensor:
        """Reconstruct the value: fetch every share and add them (mod 2^64).

        Raises:
            veil.PermissionDenied: the value was computed from a worker's private data and
                its owner did not allow this requester.
        """
        return reconstruct(self.shares)

    def refresh(self) -> AdditiveSharingTensor:
        """Fresh shares of the same value (see :func:`refresh`)."""
        return refresh(self)

    def share(
        self, *parties: Any, crypto_provider: Any = None, truncation: str = "dealer"
    ) -> AdditiveSharingTensor:
        raise ProtocolError("this tensor is already shared; .get() it first to share it anew")


# ---------------------------------------------------------------------- sharing and opening


def split(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` additive shares of int64 ``x``: ``n - 1`` uniform, the last completing the sum."""
    shares = [random_int64(x.shape) for _ in range(n - 1)]
    last = x.clone()
    for s in shares:
        last -= s
    shares.append(last)
    return shares


def _split_meta(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(x.shape, dtype=torch.int64, device="meta") for _ in range(n))


@remote_function("mpc.split", meta=_split_meta)
def split_remote(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Worker side of sharing a tensor it holds: ``n`` additive shares of int64 ``x``."""
    if x.dtype != torch.int64:
        raise ProtocolError(f"only int64 tensors can be shared, got {x.dtype}")
    if type(n) is not int or n < 2:
        raise ProtocolError(f"secret sharing needs at least 2 parties, got {n!r}")
    return tuple(split(x.detach(), n))


def share(
    value: torch.Tensor, *parties: Any, crypto_provider: Any = None, truncation: str = "dealer"
) -> AdditiveSharingTensor:
    """Secret-share int64 ``value`` among ``parties`` (workers, or names to simulate locally).

    ``truncation`` chooses how products of fixed-point values are brought back to their
    precision: ``"dealer"`` (default; truncation pairs from the crypto provider, correct for
    any number of parties, one round) or ``"local"`` (two parties: each truncates its own
    share, no round, wrong with probability ``(|z| + 1) / 2^64`` per value; see
    :mod:`veil.mpc.protocols.truncation`). Values combined in one computation must be
    shared with the same choice.

    A local tensor is split here and share ``i`` is sent to party ``i``. A pointer is split
    by the worker holding it, which sends the shares straight to the parties: the caller
    never sees the value (and a private value's restriction follows its shares).

    Raises:
        veil.ProtocolError: fewer than 2 parties, mixed party kinds, a provider that is a
            party, a non-int64 value, an unknown ``truncation`` or ``"local"`` truncation
            with more than two parties.
    """
    if len(parties) == 1 and isinstance(parties[0], (list, tuple)):
        parties = tuple(parties[0])
    ctx = context(parties, crypto_provider, truncation)
    if type(value) is PointerTensor:
        if not ctx.remote:
            raise ProtocolError("a pointer can only be shared among workers")
        if value.dtype != torch.int64:
            raise ProtocolError(f"only int64 tensors can be shared, got {value.dtype}")
        pieces = split_remote(value, ctx.n)
        shares = [
            p if party is value.location else p.move(party) for p, party in zip(pieces, ctx.parties)
        ]
        return AdditiveSharingTensor(shares, ctx)
    if not isinstance(value, torch.Tensor) or type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(f"share() takes an int64 tensor, got {type(value).__name__}")
    if value.dtype != torch.int64:
        raise ProtocolError(
            f"only int64 tensors can be shared, got {value.dtype}; use "
            ".fix_precision().share(...) for real values"
        )
    pieces = split(value.detach(), ctx.n)
    if ctx.remote:
        pieces = [_send(p, party) for p, party in zip(pieces, ctx.parties)]
    return AdditiveSharingTensor(pieces, ctx)


def reconstruct(shares: Sequence[Any]) -> torch.Tensor:
    """The sum (mod 2^64) of ``shares``, fetching pointers (one request per party)."""
    values = [s.get() if type(s) is PointerTensor else s for s in shares]
    out = values[0].clone()
    for v in values[1:]:
        out += v
    return out


def _fresh_meta(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(tuple(shape), dtype=torch.int64, device="meta")
    return out, out


@remote_function("mpc.fresh_mask", meta=_fresh_meta)
def fresh_mask(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A party's fresh random mask (kept, and sent to the next party)."""
    m = random_int64(tuple(shape))
    return m, m


@remote_function("mpc.refresh_apply")
def refresh_apply(share_: torch.Tensor, own: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """``share + own mask - previous party's mask``."""
    return share_ + own - received


def refresh(x: AdditiveSharingTensor) -> AdditiveSharingTensor:
    """Re-randomise shares: party ``i`` adds its fresh mask ``m_i`` and subtracts
    ``m_{i-1}``, received from the previous party. The sum is unchanged; the new shares are
    independent of the old ones. One round, no provider."""
    ctx = x.ctx
    n = ctx.n
    shape = tuple(x.shape)
    masks = [on_party(ctx, i, fresh_mask, shape) for i in range(n)]
    STATS.rounds += 1
    if ctx.remote:
        received = [masks[(i - 1) % n][1].move(ctx.parties[i]) for i in range(n)]
        STATS.online_bytes += n * _runtime.nbytes(masks[0][0])
    else:
        received = [masks[(i - 1) % n][1] for i in range(n)]
    return AdditiveSharingTensor(
        [refresh_apply(x.shares[i], masks[i][0], received[i]) for i in range(n)], ctx
    )


# ---------------------------------------------------------------------- local per-share ops


def _sum_windows(
    parts: torch.Tensor, grid: list[int], dilation: list[int], stride: list[int]
) -> torch.Tensor:
    """Windows ``(N, C, *kernel, *outputs)`` summed onto a zero ``(N, C, *grid)`` grid at
    their positions (element ``k`` of the window at output ``o`` lands on ``o * stride +
    k * dilation``; overlaps add): the scatter-add of :func:`fold_windows` and
    :func:`col2im`, 2-D or 3-D."""
    d = len(grid)
    kernel, outs = parts.shape[2 : 2 + d], parts.shape[2 + d :]
    out = parts.new_zeros((*parts.shape[:2], *grid))
    for offset in itertools.product(*(range(k) for k in kernel)):
        target = tuple(
            slice(o * r, o * r + s * (n - 1) + 1, s)
            for o, r, s, n in zip(offset, dilation, stride, outs)
        )
        out[(slice(None), slice(None), *target)] += parts[(slice(None), slice(None), *offset)]
    return out


def fold_windows(
    contrib: torch.Tensor,
    kernel: list[int],
    stride: list[int],
    shape: list[int],
    dilation: list[int] | None = None,
) -> torch.Tensor:
    """Sum pooling windows ``(N, C, *outputs, prod(kernel))`` back onto an ``(N, C, *shape)``
    grid (1-D to 3-D; overlapping windows add; ``dilation`` apart within a window, 1 if not
    given): the adjoint of cutting the windows out."""
    d = len(kernel)
    outs = list(contrib.shape[2 : 2 + d])
    parts = contrib.reshape(*contrib.shape[:2], *outs, *kernel)
    parts = parts.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))
    return _sum_windows(parts, list(shape[-d:]), list(dilation or [1] * d), list(stride))


def im2col(
    x: torch.Tensor, kernel: list[int], dilation: list[int], padding: list[int], stride: list[int]
) -> torch.Tensor:
    """``F.unfold`` for int64 (torch's kernel is float-only): ``(N, C, H, W)`` to
    ``(N, C kh kw, L)``, every sliding block as a column."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    n, c = x.shape[:2]
    blocks = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    blocks = blocks[..., ::dh, ::dw]  # (N, C, Ho, Wo, kh, kw)
    ho, wo = blocks.shape[2], blocks.shape[3]
    return blocks.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def col2im(
    cols: torch.Tensor,
    size: list[int],
    kernel: list[int],
    dilation: list[int],
    padding: list[int],
    stride: list[int],
) -> torch.Tensor:
    """``F.fold`` for int64, the adjoint of :func:`im2col`: columns summed back onto an
    ``(N, C, H, W)`` grid (overlaps add)."""
    (h, w), (kh, kw), (dh, dw), (ph, pw), (sh, sw) = size, kernel, dilation, padding, stride
    n = cols.shape[0]
    c = cols.shape[1] // (kh * kw)
    hp, wp = h + 2 * ph, w + 2 * pw
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    parts = cols.reshape(n, c, kh, kw, ho, wo)
    out = _sum_windows(parts, [hp, wp], [dh, dw], [sh, sw])
    return out[:, :, ph : ph + h, pw : pw + w]


def put(
    x: torch.Tensor, values: torch.Tensor, indices: list[Any], accumulate: bool
) -> torch.Tensor:
    """``x.index_put(indices, values, accumulate)``, with the values second (as the other
    scatters take their source)."""
    return aten.index_put.default(x, indices, values, accumulate)


def add_at(
    x: torch.Tensor, values: torch.Tensor, how: str, dim: int, index: torch.Tensor
) -> torch.Tensor:
    """``x.scatter_add(dim, index, values)`` (``how="scatter"``),
    ``x.index_add(dim, index, values)`` (``how="index"``) or ``x.scatter(dim, index,
    values)`` (``how="put"``, overwriting), with the values second."""
    if how == "scatter":
        return aten.scatter_add.default(x, dim, index, values)
    if how == "index":
        return aten.index_add.default(x, dim, index, values)
    if how == "put":  # x.scatter(dim, index, values): overwrite, not add
        return aten.scatter.src(x, dim, index, values)
    raise ProtocolError(f"unknown add_at kind {how!r}")


#: The aten operations a party may apply to its own share (linear, data-independent).
LOCAL_OPS: dict[str, Any] = {
    # A wrapper claims contiguous strides whatever its child's layout (an expanded or
    # transposed share), so torch may ask for a view the child cannot give: reshape gives
    # the same view when it exists and a copy otherwise.
    "view": aten.reshape.default,
    "_unsafe_view": aten.reshape.default,
    "reshape": aten.reshape.default,
    "t": aten.t.default,
    "transpose": aten.transpose.int,
    "permute": aten.permute.default,
    "expand": aten.expand.default,
    "unsqueeze": aten.unsqueeze.default,
    "squeeze": aten.squeeze.default,
    "squeeze.dim": aten.squeeze.dim,
    "squeeze.dims": aten.squeeze.dims,
    "slice": aten.slice.Tensor,
    "select": aten.select.int,
    "index": aten.index.Tensor,
    "index_select": aten.index_select.default,
    "gather": aten.gather.default,
    "flip": aten.flip.default,
    "roll": aten.roll.default,
    "repeat": aten.repeat.default,
    "clone": aten.clone.default,
    "contiguous": aten.clone.default,
    "sum": aten.sum.dim_IntList,
    "cumsum": aten.cumsum.default,
    "sum.default": aten.sum.default,
    "neg": aten.neg.default,
    "add": aten.add.Tensor,
    "sub": aten.sub.Tensor,
    "mul": aten.mul.Tensor,
    "cat": aten.cat.default,
    "stack": aten.stack.default,
    "constant_pad_nd": aten.constant_pad_nd.default,
    "unfold": aten.unfold.default,
    "im2col": im2col,
    "col2im": col2im,
    "diagonal": aten.diagonal.default,
    "tril": aten.tril.default,
    "triu": aten.triu.default,
    "lshift": aten.__lshift__.Scalar,
    "slice_scatter": aten.slice_scatter.default,
    "select_scatter": aten.select_scatter.default,
    "diagonal_scatter": aten.diagonal_scatter.default,
    "new_zeros": aten.new_zeros.default,
    "index_put": aten.index_put.default,
    "put": put,
    "add_at": add_at,
    "scatter_add": aten.scatter_add.default,
    "fold_windows": fold_windows,
}


@remote_function("mpc.local_op")
def local_op(name: str, *args: Any) -> torch.Tensor:
    """Apply the allow-listed linear op ``name`` (see :data:`LOCAL_OPS`) to a party's share."""
    fn = LOCAL_OPS.get(name)
    if fn is None:
        raise ProtocolError(f"{name!r} is not a local share operation")
    return fn(*args)


def apply_each(ctx: Context, name: str, argsets: list[tuple[Any, ...]]) -> list[Any]:
    """Apply local op ``name`` on every party; ``argsets[i]`` are party ``i``'s arguments."""
    if ctx.remote:
        return [local_op(name, *a) for a in argsets]
    fn = LOCAL_OPS[name]
    return [fn(*a) for a in argsets]


def map_shares(x: AdditiveSharingTensor, name: str, *args: Any) -> AdditiveSharingTensor:
    """The same local op, with the same public arguments, on every share of ``x``.

    A 2-D transposition is lazy: it only flips a flag, and a matrix product consuming the
    value transposes inside its own step (no extra command per party).
    """
    if name == "t" and x.dim() == 2:
        if x._pending is not None:
            return AdditiveSharingTensor.deferred(x._pending, x.ctx, not x.transposed)
        return AdditiveSharingTensor(x.raw_shares, x.ctx, not x.transposed)
    return AdditiveSharingTensor(apply_each(x.ctx, name, [(s, *args) for s in x.shares]), x.ctx)


def add_public(
    x: AdditiveSharingTensor, p: Any, *, subtract: bool = False, reverse: bool = False
) -> AdditiveSharingTensor:
    """``x + p`` (``x - p``; ``p - x`` with ``reverse``) for a public int64 tensor or int ``p``.

    Only party 0 adds ``p``; the shapes broadcast as in torch.
    """
    ctx = x.ctx
    shares = x.shares
    if reverse:
        shares = apply_each(ctx, "neg", [(s,) for s in shares])
    out = list(shares)
    first = "sub" if subtract and not reverse else "add"
    out[0] = apply_each_one(ctx, 0, first, (out[0], p))
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(getattr(p, "shape", ())))
    if tuple(shape) != tuple(x.shape):
        out[1:] = apply_each(ctx, "expand", [(s, list(shape)) for s in out[1:]])
    return AdditiveSharingTensor(out, ctx)


def apply_each_one(ctx: Context, i: int, name: str, args: tuple[Any, ...]) -> Any:
    """Local op ``name`` on party ``i`` only."""
    if ctx.remote:
        return local_op(name, *args)
    return LOCAL_OPS[name](*args)


def combine(x: AdditiveSharingTensor, y: AdditiveSharingTensor, name: str) -> AdditiveSharingTensor:
    """Share-wise ``add`` or ``sub`` of two shared values."""
    ctx = merge(x.ctx, y.ctx)
    return AdditiveSharingTensor(
        apply_each(ctx, name, [(a, b) for a, b in zip(x.shares, y.shares)]), ctx
    )


__all__ = [
    "LOCAL_OPS",
    "OPS",
    "AdditiveSharingTensor",
    "add_public",
    "apply_each",
    "combine",
    "map_shares",
    "reconstruct",
    "refresh",
    "share",
    "split",
]
