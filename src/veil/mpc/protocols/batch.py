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
   a second message. A truncation op finishes (:func:`.truncation.finish_array`, plus the
   addend).
3. Only if a Beaver op truncates: one exchange opens the second message, and each party
   finishes those ops in one command (:func:`batch_close`).

So ``k`` operations cost two rounds (one if no product truncates) and two or three
commands and one or two moves per party, instead of up to ``2k`` rounds and ``3k``
commands. With local truncation (two parties, ``ctx.truncation == "local"``; see
:mod:`.truncation`) a truncating product finishes in step 2 and a truncation sends nothing
and finishes in step 2 too: a batch of products takes one round, and a batch of
truncations alone one command per party and no exchange. The results are those of the
individual protocols (:mod:`.beaver`, :mod:`.truncation`): exact products; truncations
within one unit of the last place (local ones unless they fail, as stated there).
Nobody sees more than before: the provider never sees inputs, parties see only masked
values, and the orchestrator only routes messages.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
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
    local = bool(trunc) and ctx.truncation == "local"
    dealt = 0 if local else trunc  # local truncation needs no truncation pair
    lay = beaver_layout(kind, sx, sy, params, dealt)
    bundles = material(
        ctx, "multiplying two shared values", deal_beaver, (kind, sx, sy, params, dealt), lay.total
    )
    add = _addends(add, ctx.n)
    items = [(xs[i], ys[i], bundles[i], add[i]) for i in range(ctx.n)]
    op = Op(("b", kind, sx, sy, params, trunc, local), items, shape)
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
    local = ctx.truncation == "local"
    if local:  # no dealer material: the parties truncate their own shares
        bundles: list[Any] = [None] * ctx.n
    else:
        lay = trunc_layout(shape)
        bundles = material(ctx, "truncation", deal_trunc, (shape, bits), lay.total)
    add = _addends(add, ctx.n)
    items = [(xs[i], bundles[i], add[i]) for i in range(ctx.n)]
    out = (shape[1], shape[0]) if transposed else shape
    op = Op(("t", shape, bits, int(scale), bool(transposed), local), items, out)
    ctx.pending.append(op)
    return op


# ---------------------------------------------------------------------- party steps
#
# A batch's public description (the specs of its ops) travels as one JSON string, its
# "plan", parsed and compiled (:func:`compile_plan`: layouts, sizes, shapes, argument
# positions) once per distinct plan on each side: a command then carries one string and a
# flat list of pointers instead of nested tuples that are walked element by element. Each
# op's arguments are flat too: (x, y, bundle row, addend) for a product, (x, bundle row,
# addend) for a truncation. The elementwise work (masking, the truncations' last step) runs
# on NumPy views of the int64 tensors: the same wrapping arithmetic, bit for bit, at a
# fraction of torch's per-operation cost on these small values.

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
        if spec[0] == "b" and (
            len(spec) != 7 or not isinstance(spec[1], str) or type(spec[6]) is not bool
        ):
            raise ProtocolError(f"malformed product spec {spec!r}")
        if spec[0] == "t" and (
            len(spec) != 6 or (spec[4] and len(spec[1]) != 2) or type(spec[5]) is not bool
        ):
            raise ProtocolError(f"malformed truncation spec {spec!r}")
    return specs


class _Step:
    """One op of a plan, compiled once per plan on each side: its spec's fields and what
    the party steps derive from them (layout, sizes, shapes, where its arguments sit)."""

    __slots__ = (
        "arg", "bits", "flip", "kind", "lay", "local", "nx", "out_shape", "params", "product",
        "scale", "shape", "size", "sx", "sy", "trunc",
    )

    def __init__(self, spec: tuple[Any, ...], arg: int) -> None:
        self.arg = arg  # index of its first argument in the flat argument list
        self.product = spec[0] == "b"
        if self.product:
            self.kind, self.sx, self.sy, self.params, trunc, self.local = spec[1:]
            # ``trunc``: truncation by the dealer's protocol (a second round); ``bits``: by
            # the parties themselves, in this op's last step (local truncation)
            self.trunc = 0 if self.local else trunc
            self.bits = trunc if self.local else 0
            self.lay = beaver_layout(self.kind, self.sx, self.sy, self.params, self.trunc)
            self.nx = _numel(self.sx)
            self.size = self.nx + _numel(self.sy)
            self.shape = product_shape(self.kind, self.sx, self.sy, self.params)
            self.out_shape = self.shape
        else:
            self.shape, self.bits, self.scale, self.flip, self.local = spec[1:]
            self.trunc = 0
            self.lay = None if self.local else trunc_layout(self.shape)
            self.size = 0 if self.local else _numel(self.shape)  # its part of the message
            self.out_shape = (self.shape[1], self.shape[0]) if self.flip else self.shape


@functools.lru_cache(maxsize=1024)
def compile_plan(plan: str) -> tuple[tuple[_Step, ...], int, int]:
    """The compiled ops of a plan string, the number of their flat arguments and the length
    of the second message (the truncating products' outputs).

    Raises:
        veil.ProtocolError: see :func:`parse_plan`.
    """
    steps = []
    arg = 0
    for spec in parse_plan(plan):
        steps.append(_Step(spec, arg))
        arg += _ARITY[spec[0]]
    second = sum(_numel(st.shape) for st in steps if st.trunc)
    return tuple(steps), arg, second


def _steps(plan: str, args: tuple[Any, ...]) -> tuple[_Step, ...]:
    steps, nargs, _ = compile_plan(plan)
    if nargs != len(args):
        raise ProtocolError("a batch's arguments do not match its plan")
    return steps


def _mask_meta(i: int, plan: str, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    steps, _, _ = compile_plan(plan)
    out = torch.empty(sum(st.size for st in steps), dtype=torch.int64, device="meta")
    return out, out


@remote_function("mpc.batch_mask", meta=_mask_meta)
def batch_mask(i: int, plan: str, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: every op's masked values, concatenated (kept and sent)."""
    steps = _steps(plan, args)
    msg = np.empty(sum(st.size for st in steps), dtype=np.int64)
    pos = 0
    for st in steps:
        if not st.size:
            continue  # a local truncation sends nothing
        x = args[st.arg].numpy()
        p = st.lay.arrays(args[st.arg + (2 if st.product else 1)])
        if st.product:
            # beaver.mask_share: x_i - a_i, then y_i - b_i
            y = args[st.arg + 1].numpy()
            np.subtract(x, p["a"], out=msg[pos : pos + st.nx].reshape(st.sx))
            np.subtract(y, p["b"], out=msg[pos + st.nx : pos + st.size].reshape(st.sy))
        else:
            # truncation.mask_share: x_i * scale + r_i (+ the offset on party 0)
            out = msg[pos : pos + st.size].reshape(st.shape)
            np.multiply(x, st.scale, out=out)
            out += p["r"]
            if i == 0:
                out += truncation.offset(st.bits)
        pos += st.size
    out = torch.from_numpy(msg)
    return out, out


def _open_meta(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    steps, _, second = compile_plan(plan)
    outs = [
        torch.empty(st.out_shape, dtype=torch.int64, device="meta") for st in steps if not st.trunc
    ]
    if second:
        m = torch.empty(second, dtype=torch.int64, device="meta")
        outs += [m, m]
    return tuple(outs)


@remote_function("mpc.batch_open", meta=_open_meta)
def batch_open(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    """Step 2: results of the ops that finish now (in order), then, if a product
    truncates with the dealer's protocol, the second message (kept and sent). ``args``: the
    ``nparts`` messages received, then the ops' arguments. ``msg`` is None if no op sends
    anything (local truncations only)."""
    items = args[nparts:]
    steps = _steps(plan, items)
    _, _, total = compile_plan(plan)
    both = opened(msg, args[:nparts]) if msg is not None else None
    outs = []
    second = np.empty(total, dtype=np.int64) if total else None
    pos = 0
    pos2 = 0
    for st in steps:
        piece = both[pos : pos + st.size] if both is not None else None
        pos += st.size
        row = items[st.arg + (2 if st.product else 1)]
        if st.product:
            z = beaver.product_share(i, piece, row, st.lay, st.kind, st.sx, st.sy, st.params)
            if st.bits:  # local truncation
                z = truncation.local_share(i, z, st.bits)
            if st.trunc:
                # z_i + r_i (+ the offset on party 0): the second message
                m = z.numel()
                dst = second[pos2 : pos2 + m]
                np.add(z.numpy().reshape(-1), st.lay.arrays(row)["r"].reshape(-1), out=dst)
                if i == 0:
                    dst += truncation.offset(st.trunc)
                pos2 += m
                continue
            add = items[st.arg + 3]
        elif st.local:
            z = truncation.local_share(i, items[st.arg], st.bits, st.scale)
            if st.flip:
                z = z.t()
            add = items[st.arg + 2]
        else:
            p = st.lay.arrays(row)
            flat = truncation.finish_array(
                i, piece.numpy(), p["r_hi"].reshape(-1), p["msb"].reshape(-1), st.bits
            )
            z = torch.from_numpy(flat).view(st.shape)
            if st.flip:
                z = z.t()
            add = items[st.arg + 2]
        outs.append(z if add is None else z + add)
    if second is not None:
        m = torch.from_numpy(second)
        outs += [m, m]
    return tuple(outs)


def _close_meta(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    steps, _, _ = compile_plan(plan)
    return tuple(
        torch.empty(st.shape, dtype=torch.int64, device="meta") for st in steps if st.trunc
    )


@remote_function("mpc.batch_close", meta=_close_meta)
def batch_close(
    i: int, plan: str, msg: torch.Tensor, nparts: int, *args: Any
) -> tuple[torch.Tensor, ...]:
    """Step 3: the truncated results of the truncating products (in order)."""
    items = args[nparts:]
    steps = _steps(plan, items)
    c = opened(msg, args[:nparts]).numpy()
    outs = []
    pos = 0
    for st in steps:
        if not st.trunc:
            continue
        p = st.lay.arrays(items[st.arg + 2])
        m = _numel(st.shape)
        flat = truncation.finish_array(
            i, c[pos : pos + m], p["r_hi"].reshape(-1), p["msb"].reshape(-1), st.trunc
        )
        pos += m
        z = torch.from_numpy(flat).view(st.shape)
        add = items[st.arg + 3]
        outs.append(z if add is None else z + add)
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
    if all(op.spec[0] == "t" and op.spec[5] for op in ops):
        # local truncations only: nothing to open, one command per party
        outs = [batch_open(i, plan, None, 0, *items[i]) for i in range(n)]
    else:
        masks = [batch_mask(i, plan, *items[i]) for i in range(n)]
        parts = exchange(ctx, [m[1] for m in masks])
        outs = [
            batch_open(i, plan, masks[i][0], len(parts[i]), *parts[i], *items[i]) for i in range(n)
        ]
    later = []
    j = 0
    for op in ops:
        if op.spec[0] == "b" and op.spec[5] and not op.spec[6]:
            later.append(op)
            continue
        op.result = [outs[i][j] for i in range(n)]
        j += 1
    if later:
        parts = exchange(ctx, [o[-1] for o in outs])
        closes = [
            batch_close(i, plan, outs[i][-2], len(parts[i]), *parts[i], *items[i]) for i in range(n)
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
    "compile_plan",
    "flush",
    "parse_plan",
    "plan_text",
    "queue_product",
    "queue_truncation",
    "result",
]
