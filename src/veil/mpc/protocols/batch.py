"""Deferred products and truncations, run together: one exchange per round for many.

A product or truncation of shared values is not run when it is asked for: it is queued on
its :class:`~veil.mpc._runtime.Context` (an :class:`Op`) and its result is a shared value
whose shares are computed when first needed. Then every queued operation of that context
runs at once (:func:`flush`). The queued operations are independent by construction (their
inputs were computed before they were queued), so they share their rounds: a training
step's independent products (a layer's input and weight gradients) and the optimizer's
truncations (one per parameter) open their masked values in one exchange instead of one
each, and each party runs one command per round for all of them.

Protocol ``flush`` for operations ``op_1 .. op_k`` (Beaver products ``x * y`` / ``x @ y`` /
convolutions, optionally truncated and plus an addend; truncations ``x * s / 2^t`` plus an
addend, whose 2-D input may be lazily transposed: the parties transpose the result in their
last step), ``n`` parties, each operation with its own dealer material (a Beaver triple, with
a truncation pair if it truncates; a truncation pair), drawn when it was queued:

1. Each party ``i``, one command (:func:`batch_mask`): for every op, the message it would
   send alone (:func:`.beaver.mask_share`: ``x_i - a_i``, ``y_i - b_i``;
   :func:`.truncation.mask_share`: ``x_i * s + r_i``, party 0 adding the offset),
   flattened and concatenated into one message. One exchange opens them all: every piece
   is masked by its own fresh dealer randomness, exactly as when run alone.
2. Each party, one command (:func:`batch_open`): it splits the opened message; a Beaver op
   computes ``z_i`` (:func:`.beaver.product_share`); without truncation that (plus the
   addend) is its result; with truncation it appends ``z_i + r_i`` (offset on party 0) to
   a second message. A truncation op finishes (:func:`.truncation.finish_share`, plus the
   addend).
3. Only if a Beaver op truncates: one exchange opens the second message, and each party
   finishes those ops in one command (:func:`batch_close`).

So ``k`` operations cost two rounds (one if no product truncates) and two or three
commands and one or two moves per party, instead of up to ``2k`` rounds and ``3k``
commands. The results are those of the individual protocols (:mod:`.beaver`,
:mod:`.truncation`): exact products; truncations within one unit of the last place.
Nobody sees more than before: the provider never sees inputs, parties see only masked
values, and the orchestrator only routes messages.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from veil._errors import ProtocolError
from veil.mpc._runtime import Context, exchange, material, opened
from veil.mpc.protocols import beaver, truncation
from veil.mpc.provider import beaver_layout, deal_beaver, deal_trunc, product_shape, trunc_layout
from veil.pointers import remote_function

Shape = tuple[int, ...]


class Op:
    """One queued product or truncation: its spec (public), each party's arguments (its
    shares, dealer bundle and addend) and, once run, each party's result share."""

    __slots__ = ("items", "result", "shape", "spec")

    def __init__(self, spec: tuple[Any, ...], items: list[tuple[Any, ...]], shape: Shape):
        self.spec = spec
        self.items = items
        self.shape = shape
        self.result: list[Any] | None = None


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _addends(add: list[Any] | None, n: int) -> list[Any]:
    return add if add is not None else [None] * n


def queue_product(
    ctx: Context,
    xs: list[Any],
    ys: list[Any],
    kind: str,
    params: tuple[Any, ...],
    trunc: int,
    add: list[Any] | None,
) -> Op:
    """Queue shares of ``op(x, y)`` (``>> trunc`` if ``trunc``), plus ``add[i]`` on party ``i``.

    Raises:
        veil.ProtocolError: no crypto provider.
        RuntimeError: the shapes do not fit ``kind`` (from torch, on meta tensors).
    """
    sx, sy, params = tuple(xs[0].shape), tuple(ys[0].shape), tuple(params)
    shape = product_shape(kind, sx, sy, params)
    lay = beaver_layout(kind, sx, sy, params, trunc)
    bundles = material(
        ctx, "multiplying two shared values", deal_beaver, (kind, sx, sy, params, trunc), lay.total
    )
    add = _addends(add, ctx.n)
    items = [(xs[i], ys[i], bundles[i], add[i]) for i in range(ctx.n)]
    op = Op(("b", kind, sx, sy, params, trunc), items, shape)
    ctx.pending.append(op)
    return op


def queue_truncation(
    ctx: Context,
    xs: list[Any],
    bits: int,
    scale: int,
    add: list[Any] | None,
    transposed: bool = False,
) -> Op:
    """Queue shares of ``x * scale / 2^bits`` (stochastic rounding), plus ``add[i]``.

    ``transposed``: ``xs`` hold the 2-D transpose of ``x`` (a lazy transposition, applied
    by the parties in their last step instead of in a command of its own).
    """
    shape = tuple(xs[0].shape)
    lay = trunc_layout(shape)
    bundles = material(ctx, "truncation", deal_trunc, (shape, bits), lay.total)
    add = _addends(add, ctx.n)
    items = [(xs[i], bundles[i], add[i]) for i in range(ctx.n)]
    out = (shape[1], shape[0]) if transposed else shape
    op = Op(("t", shape, bits, int(scale), bool(transposed)), items, out)
    ctx.pending.append(op)
    return op


# ---------------------------------------------------------------------- party steps
#
# A batch's public description (the specs of its ops) travels as one JSON string, its
# "plan", parsed once per distinct plan on each side: a command then carries one string
# and a flat list of pointers instead of nested tuples that are walked element by element.
# Each op's arguments are flat too: (x, y, bundle row, addend) for a product, (x, bundle
# row, addend) for a truncation.

_ARITY = {"b": 4, "t": 3}


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


@functools.lru_cache(maxsize=1024)
def plan_text(specs: tuple[Any, ...]) -> str:
    """The plan string of ``specs`` (JSON)."""
    return json.dumps(specs, separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def parse_plan(plan: str) -> tuple[tuple[Any, ...], ...]:
    """The specs of a plan string, checked.

    Raises:
        veil.ProtocolError: not a list of product (``"b"``) and truncation (``"t"``) specs.
    """
    try:
        specs = _tuples(json.loads(plan))
    except (TypeError, ValueError):
        raise ProtocolError("a batch plan must be a JSON list of operation specs") from None
    if not isinstance(specs, tuple) or not specs:
        raise ProtocolError("a batch plan must be a non-empty list of operation specs")
    for spec in specs:
        if not isinstance(spec, tuple) or not spec or spec[0] not in _ARITY:
            raise ProtocolError(f"unknown batched operation {spec!r}")
        if spec[0] == "b" and (len(spec) != 6 or not isinstance(spec[1], str)):
            raise ProtocolError(f"malformed product spec {spec!r}")
        if spec[0] == "t" and (len(spec) != 5 or (spec[4] and len(spec[1]) != 2)):
            raise ProtocolError(f"malformed truncation spec {spec!r}")
    return specs


def _items(specs: tuple[Any, ...], args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Split the flat arguments into one tuple per op."""
    out = []
    pos = 0
    for spec in specs:
        k = _ARITY[spec[0]]
        out.append(args[pos : pos + k])
        pos += k
    if pos != len(args):
        raise ProtocolError("a batch's arguments do not match its plan")
    return out


def _sizes(specs: Any) -> list[int]:
    """Length of each op's piece of the first message."""
    return [
        _numel(spec[2]) + _numel(spec[3]) if spec[0] == "b" else _numel(spec[1])
        for spec in specs
    ]


def _mask_meta(i: int, plan: str, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(sum(_sizes(parse_plan(plan))), dtype=torch.int64, device="meta")
    return out, out


@remote_function("mpc.batch_mask", meta=_mask_meta)
def batch_mask(i: int, plan: str, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: every op's masked values, concatenated (kept and sent)."""
    specs = parse_plan(plan)
    pieces = []
    for spec, item in zip(specs, _items(specs, args)):
        if spec[0] == "b":
            kind, sx, sy, params, trunc = spec[1:]
            lay = beaver_layout(kind, sx, sy, params, trunc)
            pieces.append(beaver.mask_share(item[0], item[1], item[2], lay))
        else:
            msg = truncation.mask_share(i, item[0], spec[3], item[1], spec[2])
            pieces.append(msg.reshape(-1))
    msg = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return msg, msg


def _open_meta(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    outs: list[torch.Tensor] = []
    second = 0
    for spec in parse_plan(plan):
        if spec[0] == "b":
            kind, sx, sy, params, trunc = spec[1:]
            shape = product_shape(kind, sx, sy, params)
            if trunc:
                second += _numel(shape)
                continue
        else:
            shape = (spec[1][1], spec[1][0]) if spec[4] else spec[1]
        outs.append(torch.empty(shape, dtype=torch.int64, device="meta"))
    if second:
        m = torch.empty(second, dtype=torch.int64, device="meta")
        outs += [m, m]
    return tuple(outs)


@remote_function("mpc.batch_open", meta=_open_meta)
def batch_open(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    """Step 2: results of the ops that finish now (in order), then, if a product
    truncates, the second message (kept and sent). ``args``: the ``nparts`` messages
    received, then the ops' arguments."""
    specs = parse_plan(plan)
    both = opened(msg, args[:nparts])
    outs = []
    second = []
    pos = 0
    for spec, item, size in zip(specs, _items(specs, args[nparts:]), _sizes(specs)):
        piece = both[pos : pos + size]
        pos += size
        if spec[0] == "b":
            kind, sx, sy, params, trunc = spec[1:]
            lay = beaver_layout(kind, sx, sy, params, trunc)
            z = beaver.product_share(i, piece, item[2], lay, kind, sx, sy, params)
            if trunc:
                z += lay.get(item[2], "r")
                if i == 0:
                    z += truncation.offset(trunc)
                second.append(z.reshape(-1))
                continue
        else:
            z = truncation.finish_share(i, piece.view(spec[1]), item[1], spec[2])
            if spec[4]:
                z = z.t()
        add = item[-1]
        outs.append(z if add is None else z + add)
    if second:
        m = torch.cat(second) if len(second) > 1 else second[0]
        outs += [m, m]
    return tuple(outs)


def _close_meta(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    outs = []
    for spec in parse_plan(plan):
        if spec[0] == "b" and spec[5]:
            shape = product_shape(*spec[1:5])
            outs.append(torch.empty(shape, dtype=torch.int64, device="meta"))
    return tuple(outs)


@remote_function("mpc.batch_close", meta=_close_meta)
def batch_close(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    """Step 3: the truncated results of the truncating products (in order)."""
    specs = parse_plan(plan)
    c = opened(msg, args[:nparts])
    outs = []
    pos = 0
    for spec, item in zip(specs, _items(specs, args[nparts:])):
        if spec[0] != "b" or not spec[5]:
            continue
        shape = product_shape(*spec[1:5])
        m = _numel(shape)
        z = truncation.finish_share(i, c[pos : pos + m].view(shape), item[2], spec[5])
        pos += m
        outs.append(z if item[3] is None else z + item[3])
    return tuple(outs)


# ---------------------------------------------------------------------- orchestration


def flush(ctx: Context) -> None:
    """Run every operation queued on ``ctx`` (see the module doc) and store their results."""
    ops = ctx.pending
    if not ops:
        return
    ctx.pending = []
    n = ctx.n
    plan = plan_text(tuple(op.spec for op in ops))
    items = [tuple(a for op in ops for a in op.items[i]) for i in range(n)]
    masks = [batch_mask(i, plan, *items[i]) for i in range(n)]
    parts = exchange(ctx, [m[1] for m in masks])
    outs = [
        batch_open(i, plan, masks[i][0], n - 1, *parts[i], *items[i]) for i in range(n)
    ]
    later = []
    j = 0
    for op in ops:
        if op.spec[0] == "b" and op.spec[5]:
            later.append(op)
            continue
        op.result = [outs[i][j] for i in range(n)]
        j += 1
    if later:
        parts = exchange(ctx, [o[-1] for o in outs])
        closes = [
            batch_close(i, plan, outs[i][-2], n - 1, *parts[i], *items[i]) for i in range(n)
        ]
        for j, op in enumerate(later):
            op.result = [closes[i][j] for i in range(n)]
    for op in ops:
        op.items = []  # the inputs are no longer needed


def result(ctx: Context, op: Op) -> list[Any]:
    """The result shares of ``op``, running the queue of ``ctx`` first if needed.

    Raises:
        veil.ProtocolError: the batch ``op`` belonged to failed before producing it.
    """
    if op.result is None:
        flush(ctx)
        if op.result is None:
            raise ProtocolError("a deferred secure computation did not complete (see the "
                                "error raised when its batch ran)")
    return op.result


__all__ = [
    "Op",
    "batch_close",
    "batch_mask",
    "batch_open",
    "flush",
    "parse_plan",
    "plan_text",
    "queue_product",
    "queue_truncation",
    "result",
]
