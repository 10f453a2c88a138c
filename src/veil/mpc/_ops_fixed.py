"""aten handlers of FixedPrecisionTensor: creation, views, arithmetic, reductions, comparisons.

Operands are unwrapped by hand (no ``tree_map``): a handler sees ``FixedPrecisionTensor``
arguments, public float or integer tensors and Python scalars, and builds the result from
the children with :mod:`veil.mpc._values`. Precisions of two fixed-point operands are
aligned by shifting the smaller one (exact); products of precisions ``f`` and ``g``
truncate ``min(f, g)`` bits.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from veil._errors import ProtocolError
from veil.mpc import _values as V
from veil.mpc import _views, encoding
from veil.mpc.fixed import OPS, FixedPrecisionTensor
from veil.mpc.sharing import AdditiveSharingTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
AST = AdditiveSharingTensor
implements = OPS.implements


# ---------------------------------------------------------------------- operand helpers


def wrap(child: Any, f: int, dtype: torch.dtype = torch.float32) -> FixedPrecisionTensor:
    return FPT(child, f, dtype)


def child_of(x: FixedPrecisionTensor) -> Any:
    c = x.child
    if type(c) is not AST and type(c) is not torch.Tensor:
        V.check_plain(c)
    return c


def public_child(value: torch.Tensor | float | int, f: int) -> torch.Tensor:
    """Encode a public float tensor or scalar with ``f`` fractional bits."""
    return encoding.encode(value, f)


def fixed_pair(a: Any, b: Any) -> tuple[Any, Any, int, torch.dtype]:
    """Children of two operands aligned to one precision, plus that precision and dtype.

    Public float tensors and scalars are encoded; integer/bool tensors count as precision 0.
    """
    fa = a.precision_bits if type(a) is FPT else None
    fb = b.precision_bits if type(b) is FPT else None
    f = max(x for x in (fa, fb) if x is not None)
    dtype = (
        a.dtype
        if fa is not None and a.dtype != torch.bool
        else (b.dtype if fb is not None and b.dtype != torch.bool else torch.float32)
    )
    ca = _as_child(a, fa, f)
    cb = _as_child(b, fb, f)
    return ca, cb, f, dtype


def _as_child(x: Any, fx: int | None, f: int) -> Any:
    if fx is not None:
        c = child_of(x)
        return V.mul_int(c, 1 << (f - fx)) if fx < f else c
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return public_child(x, f)
        return x.to(torch.int64) << f
    if isinstance(x, bool):
        x = int(x)
    if isinstance(x, int):
        return x << f
    return public_child(float(x), f)


def scale(child: Any, value: float | int, plus: Any = None) -> Any:
    """``child * value`` for a public real ``value``, keeping ~24 significant bits of it,
    plus the ring value ``plus`` if given (fused into the truncation's last step)."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 2**24):
        out = V.mul_int(child, int(value))
        return out if plus is None else V.add(plus, out)
    m, s = encoding.scalar_multiplier(float(value))
    return V.truncate(child, s, m, plus)


#: Fractional bits kept of public per-element factors (:func:`scale_each`), as
#: :func:`scale` keeps about 24 significant bits of a scalar.
FACTOR_BITS = 24


def factor_ints(factors: torch.Tensor) -> torch.Tensor:
    """Public real factors as integers with :data:`FACTOR_BITS` fractional bits."""
    return torch.round(factors.double() * 2.0**FACTOR_BITS).to(torch.int64)


def scale_each(child: Any, factors: torch.Tensor) -> Any:
    """``child * factors`` elementwise (broadcasting) for public real ``factors``: exact
    integer products, then one truncation by :data:`FACTOR_BITS`."""
    return V.truncate(V.mul_int(child, factor_ints(factors)), FACTOR_BITS)


def fpt_args(args: tuple[Any, ...]) -> FixedPrecisionTensor:
    for a in args:
        if type(a) is FPT:
            return a
    raise ProtocolError("no fixed-precision operand")


# ---------------------------------------------------------------------- creation and aliasing


def _copy_cache(src: FixedPrecisionTensor, dst: FixedPrecisionTensor) -> FixedPrecisionTensor:
    cache = getattr(src, "cache", None)
    if cache is not None:
        dst.cache = cache
    return dst


@implements(aten.detach, aten.alias, aten.lift_fresh)
def _detach(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    out = _copy_cache(x, FPT(x.child, x.precision_bits, x.dtype))
    if func.overloadpacket is aten.lift_fresh:
        return out
    return _views.record(out, x, "alias", ())  # x.detach().zero_() zeroes x, as in torch


@implements(aten.clone)
def _clone(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    return FPT(x.child, x.precision_bits, x.dtype)


@implements(aten._to_copy)
def _to_copy(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    dtype = kwargs.get("dtype") or x.dtype
    device = kwargs.get("device")
    if device is not None and torch.device(device).type not in ("cpu",):
        raise NotImplementedError(f"{func}: fixed-precision tensors stay on the cpu device")
    if dtype.is_floating_point:
        return as_real(x, dtype)
    raise NotImplementedError(f"{func} to {dtype} is not supported on a FixedPrecisionTensor")


@implements(aten.to.dtype)
def _to_dtype(func: Any, args: Any, kwargs: Any) -> Any:
    """``x.to(dtype)``, which torch's decompositions call: a float dtype keeps the values."""
    dtype = args[1] if len(args) > 1 else kwargs["dtype"]
    return _to_copy(func, args[:1], {"dtype": dtype})


@implements(aten.real)
def _real(func: Any, args: Any, kwargs: Any) -> Any:
    return args[0]  # fixed-point values are real


def _like(
    x: FixedPrecisionTensor, value: float, kwargs: dict[str, Any], shape: Any = None
) -> FixedPrecisionTensor:
    dtype = kwargs.get("dtype") or x.dtype
    shape = tuple(x.shape) if shape is None else tuple(shape)
    child = torch.full(
        shape, int(encoding.encode(float(value), x.precision_bits)), dtype=torch.int64
    )
    return FPT(child, x.precision_bits, dtype)


@implements(aten.ones_like)
def _ones_like(func: Any, args: Any, kwargs: Any) -> Any:
    return _like(args[0], 1.0, kwargs)


@implements(aten.zeros_like, aten.empty_like)
def _zeros_like(func: Any, args: Any, kwargs: Any) -> Any:
    return _like(args[0], 0.0, kwargs)


@implements(aten.full_like)
def _full_like(func: Any, args: Any, kwargs: Any) -> Any:
    return _like(args[0], float(args[1]), kwargs)


@implements(aten.new_zeros, aten.new_empty, aten.new_empty_strided)
def _new_zeros(func: Any, args: Any, kwargs: Any) -> Any:
    return _like(args[0], 0.0, kwargs, args[1])


@implements(aten.new_ones)
def _new_ones(func: Any, args: Any, kwargs: Any) -> Any:
    return _like(args[0], 1.0, kwargs, args[1])


@implements(aten.new_full)
def _new_full(func: Any, args: Any, kwargs: Any) -> Any:
    return _like(args[0], float(args[2]), kwargs, args[1])


@implements(aten.zero_)
def _zero_(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    x.child = torch.zeros(tuple(x.shape), dtype=torch.int64)
    return x


@implements(aten.fill_)
def _fill_(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    x.child = torch.full(
        tuple(x.shape), int(encoding.encode(float(args[1]), x.precision_bits)), dtype=torch.int64
    )
    return x


@implements(aten.copy_)
def _copy_(func: Any, args: Any, kwargs: Any) -> Any:
    dst, src = args[0], args[1]
    if type(dst) is not FPT:
        raise TypeError(
            f"{func}: fixed-precision values cannot be written into a plain {dst.dtype} tensor "
            f"of shape {tuple(dst.shape)}. Either a plain module's buffer (such as "
            "BatchNorm's running statistics) is fed shared inputs: convert the module with "
            ".fix_precision() and share it too; or a torch kernel builds its result as a "
            "plain tensor (pad_packed_sequence, the gradient through packed sequences), "
            "which cannot hold fixed-point values"
        )
    c = _as_child(src, src.precision_bits if type(src) is FPT else None, dst.precision_bits)
    if tuple(c.shape) != tuple(dst.shape):
        c = V.shape_op(c, "expand", list(dst.shape))
    dst.child = c
    return dst


@implements(aten.is_same_size)
def _is_same_size(func: Any, args: Any, kwargs: Any) -> Any:
    return tuple(args[0].shape) == tuple(args[1].shape)


# ---------------------------------------------------------------------- views and indexing


def _restores_reduced_dim(x: FixedPrecisionTensor, dim: int) -> bool:
    """Whether ``x.unsqueeze(dim)`` puts back the dim that the max/min whose secret indices
    ``x`` holds reduced (autograd does, before scattering the gradient): the indices keep
    their one-hot then."""
    cache = getattr(x, "cache", None)
    return bool(cache) and "dim" in cache and dim % (x.dim() + 1) == cache["dim"]


def _shape_handler(name: str, *, drop: tuple[str, ...] = ()) -> Any:
    def handler(func: Any, args: Any, kwargs: Any) -> Any:
        x = args[0]
        extra = [v for k, v in kwargs.items() if k not in drop]
        params = (*args[1:], *extra)
        result = FPT(V.shape_op(child_of(x), name, *params), x.precision_bits, x.dtype)
        if name in ("view", "_unsafe_view") or (
            name == "unsqueeze" and _restores_reduced_dim(x, args[1])
        ):
            _copy_cache(x, result)
        if name in _views.VIEW_OPS:
            _views.record(result, x, name, params)
        return result

    return handler


for _name, _op in (
    ("view", aten.view),
    ("_unsafe_view", aten._unsafe_view),
    ("reshape", aten.reshape),
    ("t", aten.t),
    ("transpose", aten.transpose),
    ("permute", aten.permute),
    ("expand", aten.expand),
    ("unsqueeze", aten.unsqueeze),
    ("flip", aten.flip),
    ("roll", aten.roll),
    ("repeat", aten.repeat),
    ("unfold", aten.unfold),
    ("diagonal", aten.diagonal),
    ("tril", aten.tril),
    ("triu", aten.triu),
    ("index_select", aten.index_select),
    ("gather", aten.gather),
):
    implements(_op)(_shape_handler(_name))

implements(aten.squeeze.default)(_shape_handler("squeeze"))
implements(aten.squeeze.dim)(_shape_handler("squeeze.dim"))
implements(aten.squeeze.dims)(_shape_handler("squeeze.dims"))
implements(aten.select.int)(_shape_handler("select"))
implements(aten.cumsum.default)(_shape_handler("cumsum", drop=("dtype",)))
implements(aten.im2col.default)(_shape_handler("im2col"))  # F.unfold, linear
implements(aten.col2im.default)(_shape_handler("col2im"))  # F.fold and unfold's backward


@implements(aten.constant_pad_nd)
def _constant_pad(func: Any, args: Any, kwargs: Any) -> Any:
    """``F.pad(x, pads, value=v)``: every party pads its share with zeros, and the public
    ``v`` is added on the border (party 0's share; nothing for ``v = 0``)."""
    x, pads = args[0], list(args[1])
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    c = V.shape_op(child_of(x), "constant_pad_nd", pads, 0)
    if value:
        inside = torch.zeros(tuple(x.shape), dtype=torch.int64)
        border = torch.nn.functional.pad(inside, pads, value=1)
        c = V.add(c, border * int(public_child(float(value), x.precision_bits)))
    return FPT(c, x.precision_bits, x.dtype)


@implements(aten.flatten.using_ints)
def _flatten(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    shape = list(x.shape)
    if not shape:
        return _shape_handler("reshape")(func, (x, [1]), {})
    start, end = start % len(shape), end % len(shape)
    size = 1
    for d in shape[start : end + 1]:
        size *= d
    return _shape_handler("reshape")(func, (x, [*shape[:start], size, *shape[end + 1 :]]), {})


def _inplace_shape_handler(name: str) -> Any:
    """In-place view ops (``squeeze_``, ``unsqueeze_``, ``t_``, ``transpose_``), which torch
    itself emits, for instance when it decomposes ``vector @ matrix``: the child takes the
    out-of-place op and the wrapper's own sizes change to match."""

    def handler(func: Any, args: Any, kwargs: Any) -> Any:
        x = args[0]
        old_shape = tuple(x.shape)
        params = (*args[1:], *kwargs.values())
        x.child = V.shape_op(child_of(x), name, *params)
        x.__dict__.pop("cache", None)
        V.restride(func, x, args[1:], kwargs)
        _views.reshaped(x, name, params, old_shape)
        return x

    return handler


for _name, _op in V.INPLACE_SHAPE_OPS:
    implements(_op)(_inplace_shape_handler(_name))


@implements(aten.slice.Tensor)
def _slice(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    full = list(args[1:]) + [None] * (4 - len(args[1:]))
    dim, start, end, step = full
    dim = kwargs.get("dim", 0 if dim is None else dim)
    start = kwargs.get("start", start)
    end = kwargs.get("end", end)
    step = kwargs.get("step", 1 if step is None else step)
    params = (dim, start, end, step)
    out = FPT(V.shape_op(child_of(x), "slice", *params), x.precision_bits, x.dtype)
    return _views.record(out, x, "slice", params)


def _contiguous_strides(size: list[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


@implements(aten.as_strided.default)
def _as_strided(func: Any, args: Any, kwargs: Any) -> Any:
    """``as_strided`` with the contiguous strides of its size over all the values: a
    reshape (torch's group norm decomposition uses it so). Other strides would read the
    values' memory layout, which a FixedPrecisionTensor does not have: they raise."""
    x, size, stride = args[0], list(args[1]), list(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0)
    numel = 1
    for n in size:
        numel *= n
    if (offset or 0) != 0 or numel != x.numel() or (
        numel > 1 and stride != _contiguous_strides(size)
    ):
        raise NotImplementedError(
            f"{func} with size {size}, stride {stride} and offset {offset} on a "
            "FixedPrecisionTensor (only a contiguous view of all its values)"
        )
    return _shape_handler("reshape")(func, (x, size), {})


@implements(aten._local_scalar_dense.default)
def _item(func: Any, args: Any, kwargs: Any) -> Any:
    """``.item()``: the value of a public fixed-point scalar; a shared (or remote) one must be
    revealed explicitly, so that nothing is opened by accident."""
    x = args[0]
    if type(x.child) is not torch.Tensor:
        raise ProtocolError(
            ".item() would reveal a secret-shared (or remote) value: call "
            "x.get().float_precision().item() if its owners allow it"
        )
    return x.float_precision().item()


@implements(aten.narrow.default)
def _narrow(func: Any, args: Any, kwargs: Any) -> Any:
    x, dim, start, length = args[0], args[1], args[2], args[3]
    start = start % x.shape[dim] if start < 0 else start
    return _slice(func, (x, dim, start, start + length, 1), {})


@implements(aten.index.Tensor)
def _index(func: Any, args: Any, kwargs: Any) -> Any:
    x, indices = args[0], args[1]
    for ix in indices:
        if ix is not None and type(ix) is not torch.Tensor:
            raise NotImplementedError(f"{func}: indexing with secret indices is not supported")
    return FPT(V.shape_op(child_of(x), "index", indices), x.precision_bits, x.dtype)


@implements(aten.cat, aten.stack)
def _cat(func: Any, args: Any, kwargs: Any) -> Any:
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    f = max(t.precision_bits for t in tensors if type(t) is FPT)
    first = fpt_args(tuple(tensors))
    children = [_as_child(t, t.precision_bits if type(t) is FPT else None, f) for t in tensors]
    name = "cat" if func.overloadpacket is aten.cat else "stack"
    return FPT(V.cat(children, name, dim), f, first.dtype)


def _tensor_split_bounds(size: int, how: Any) -> list[tuple[int, int]]:
    """``(start, end)`` of each piece of ``tensor_split``: ``how`` sections (the first
    ``size % how`` one longer) or the pieces between a list of split points."""
    if isinstance(how, int):
        q, r = divmod(size, how)
        ends = [(i + 1) * q + min(i + 1, r) for i in range(how)]
        return list(zip([0, *ends[:-1]], ends))
    points = [min(max(int(p), 0), size) for p in how]
    return list(zip([0, *points], [*points, size]))


@implements(aten.split_with_sizes, aten.split, aten.unbind, aten.chunk)
@implements(aten.tensor_split.sections, aten.tensor_split.indices)
def _split(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    c = child_of(x)
    packet = func.overloadpacket
    if packet is aten.unbind:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        views = [("select", (dim, i)) for i in range(x.shape[dim])]
    else:
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        how, size = args[1], x.shape[dim]
        if packet is aten.tensor_split:
            bounds = _tensor_split_bounds(size, how)
        else:
            if packet is aten.chunk:
                how = -(-size // how)
            if isinstance(how, int):  # pieces of that size, the last one shorter
                how = [min(how, size - s) for s in range(0, size, how)]
            ends = list(itertools.accumulate(how))
            bounds = list(zip([0, *ends[:-1]], ends))
        views = [("slice", (dim, a, max(a, b), 1)) for a, b in bounds]
    return [
        _views.record(FPT(V.shape_op(c, name, *p), x.precision_bits, x.dtype), x, name, p)
        for name, p in views
    ]


# ---------------------------------------------------------------------- arithmetic


def _binary_add(a: Any, b: Any, alpha: Any, subtract: bool) -> FixedPrecisionTensor:
    if alpha != 1 and type(b) is FPT:
        if type(a) is FPT and a.precision_bits == b.precision_bits:
            # a + alpha * b in one truncation (the optimizer's p.add_(g, alpha=-lr))
            child = scale(child_of(b), -alpha if subtract else alpha, child_of(a))
            return FPT(child, a.precision_bits, a.dtype)
        b = FPT(scale(child_of(b), alpha), b.precision_bits, b.dtype)
        alpha = 1
    ca, cb, f, dtype = fixed_pair(a, b if alpha == 1 else b * alpha)
    return FPT(V.sub(ca, cb) if subtract else V.add(ca, cb), f, dtype)


@implements(aten.add.Tensor, aten.add.Scalar)
def _add(func: Any, args: Any, kwargs: Any) -> Any:
    return _binary_add(args[0], args[1], kwargs.get("alpha", 1), False)


@implements(aten.sub.Tensor, aten.sub.Scalar)
def _sub(func: Any, args: Any, kwargs: Any) -> Any:
    return _binary_add(args[0], args[1], kwargs.get("alpha", 1), True)


@implements(aten.rsub.Tensor, aten.rsub.Scalar)
def _rsub(func: Any, args: Any, kwargs: Any) -> Any:
    return (
        _binary_add(args[1], args[0], 1, True)
        if kwargs.get("alpha", 1) == 1
        else _binary_add(
            args[1],
            FPT(scale(child_of(args[0]), kwargs["alpha"]), args[0].precision_bits, args[0].dtype),
            1,
            True,
        )
    )


def _inplace(result: FixedPrecisionTensor, target: Any) -> Any:
    if type(target) is not FPT:
        raise NotImplementedError(
            "an in-place op would write fixed-point values into a plain tensor"
        )
    if result.precision_bits != target.precision_bits:
        result = FPT(
            V.truncate(result.child, result.precision_bits - target.precision_bits),
            target.precision_bits,
            target.dtype,
        )
    target.child = result.child
    return target


@implements(aten.add_.Tensor, aten.add_.Scalar)
def _add_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_binary_add(args[0], args[1], kwargs.get("alpha", 1), False), args[0])


@implements(aten.sub_.Tensor, aten.sub_.Scalar)
def _sub_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(_binary_add(args[0], args[1], kwargs.get("alpha", 1), True), args[0])


def negate(x: FixedPrecisionTensor) -> FixedPrecisionTensor:
    """``-x`` (local: every party negates its share)."""
    return FPT(V.neg(child_of(x)), x.precision_bits, x.dtype)


@implements(aten.neg)
def _neg(func: Any, args: Any, kwargs: Any) -> Any:
    return negate(args[0])


def multiply(a: Any, b: Any) -> FixedPrecisionTensor:
    """``a * b`` for fixed-point operands, public tensors and scalars."""
    if type(a) is not FPT:
        a, b = b, a
    if type(b) is FPT:
        fa, fb = a.precision_bits, b.precision_bits
        dtype = a.dtype if a.dtype != torch.bool else b.dtype
        return FPT(V.product(child_of(a), child_of(b), "mul", (), min(fa, fb)), max(fa, fb), dtype)
    if isinstance(b, torch.Tensor):
        if b.is_floating_point():
            f = a.precision_bits
            return FPT(V.product(child_of(a), public_child(b, f), "mul", (), f), f, a.dtype)
        return FPT(V.mul_int(child_of(a), b.to(torch.int64)), a.precision_bits, a.dtype)
    return FPT(scale(child_of(a), b), a.precision_bits, a.dtype)


@implements(aten.mul.Tensor, aten.mul.Scalar)
def _mul(func: Any, args: Any, kwargs: Any) -> Any:
    return multiply(args[0], args[1])


@implements(aten.mul_.Tensor, aten.mul_.Scalar)
def _mul_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(multiply(args[0], args[1]), args[0])


def as_real(x: FixedPrecisionTensor, dtype: torch.dtype = torch.float32) -> FixedPrecisionTensor:
    """``x`` as a float FixedPrecisionTensor: 0/1 comparison results and integer counts
    (precision 0) get the default fractional bits, or a later ``mask / count`` would be
    rounded to an integer."""
    if not x.dtype.is_floating_point and x.precision_bits == 0:
        f = encoding.DEFAULT_PRECISION
        return FPT(V.mul_int(x.child, 1 << f), f, dtype)
    return FPT(x.child, x.precision_bits, dtype)


def divide(a: Any, b: Any) -> FixedPrecisionTensor:
    if type(b) is FPT:
        from veil.mpc import approximations

        if not b.dtype.is_floating_point:
            b = as_real(b)
        return multiply(a, approximations.reciprocal(b))
    if type(a) is not FPT:
        raise NotImplementedError(
            "dividing a public value by a fixed-point one: use x.reciprocal() * value"
        )
    if isinstance(b, torch.Tensor):
        return multiply(a, 1.0 / b.double())
    return FPT(scale(child_of(a), 1.0 / float(b)), a.precision_bits, a.dtype)


@implements(aten.div.Tensor, aten.div.Scalar, aten.true_divide.Tensor, aten.true_divide.Scalar)
def _div(func: Any, args: Any, kwargs: Any) -> Any:
    if kwargs.get("rounding_mode") is not None:
        raise NotImplementedError(f"{func} with rounding_mode on a FixedPrecisionTensor")
    return divide(args[0], args[1])


@implements(aten.div_.Tensor, aten.div_.Scalar)
def _div_(func: Any, args: Any, kwargs: Any) -> Any:
    return _inplace(divide(args[0], args[1]), args[0])


def power(x: FixedPrecisionTensor, k: int) -> FixedPrecisionTensor:
    """``x ** k`` for a small non-negative integer ``k`` (square-and-multiply)."""
    if k == 0:
        return _like(x, 1.0, {})
    result = None
    base = x
    while True:
        if k & 1:
            result = base if result is None else multiply(result, base)
        k >>= 1
        if not k:
            return result  # type: ignore[return-value]
        base = multiply(base, base)


def quarter_power(x: FixedPrecisionTensor, e: float) -> FixedPrecisionTensor:
    """``x ** e`` for positive ``x`` and a non-integer multiple ``e`` of 1/4 with
    ``|e| <= 8`` (``nn.LocalResponseNorm``'s 0.75, ``LPPool``'s -0.5), as a product of
    integer powers and roots: ``x^n sqrt(x) sqrt(sqrt(x))`` as needed for ``e > 0``, the
    same of ``1/x`` and ``rsqrt(x)`` for ``e < 0`` (so no factor is a small number whose
    reciprocal is taken). Domain and accuracy compose those of
    :func:`~veil.mpc.approximations.sqrt`, ``rsqrt`` and ``reciprocal``: ``x`` in
    [2^-14, 2^44), about 1e-4 relative plus a few units in the last place."""
    from veil.mpc import approximations

    whole, quarters = divmod(round(abs(e) * 4), 4)
    if e > 0:
        base, root = x, approximations.sqrt(x)
    else:
        base = approximations.reciprocal(x, positive=True) if whole else None
        root = approximations.rsqrt(x)
    parts = [power(base, whole)] if whole else []
    if quarters != 2:
        parts.append(approximations.sqrt(root))
    if quarters != 1:
        parts.append(root)
    out = parts[0]
    for p in parts[1:]:
        out = multiply(out, p)
    return out


@implements(aten.pow.Tensor_Scalar)
def _pow(func: Any, args: Any, kwargs: Any) -> Any:
    x, k = args[0], args[1]
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, int) and 0 <= k <= 64:
        return power(x, k)
    if k == 0.5:
        from veil.mpc import approximations

        return approximations.sqrt(x)
    if isinstance(k, int) and -64 <= k < 0:
        from veil.mpc import approximations

        return power(approximations.reciprocal(x), -k)
    if isinstance(k, float) and (k * 4).is_integer() and abs(k) <= 8:
        return quarter_power(x, k)
    raise NotImplementedError(
        f"{func} with exponent {k!r}: only integer powers -64..64 and multiples of 1/4 up "
        "to 8 in magnitude (of positive values) are supported on a FixedPrecisionTensor"
    )


@implements(aten.square)
def _square(func: Any, args: Any, kwargs: Any) -> Any:
    return multiply(args[0], args[0])


# ---------------------------------------------------------------------- products


def matmul(a: Any, b: Any) -> FixedPrecisionTensor:
    if type(a) is FPT and type(b) is FPT:
        fa, fb = a.precision_bits, b.precision_bits
        return FPT(
            V.product(child_of(a), child_of(b), "matmul", (), min(fa, fb)), max(fa, fb), a.dtype
        )
    x = a if type(a) is FPT else b
    f = x.precision_bits
    ca = child_of(a) if type(a) is FPT else _public_operand(a, f)
    cb = child_of(b) if type(b) is FPT else _public_operand(b, f)
    trunc = (
        f
        if (type(a) is FPT or a.is_floating_point()) and (type(b) is FPT or b.is_floating_point())
        else 0
    )
    return FPT(V.product(ca, cb, "matmul", (), trunc), f, x.dtype)


def _public_operand(t: torch.Tensor, f: int) -> torch.Tensor:
    return public_child(t, f) if t.is_floating_point() else t.to(torch.int64)


@implements(aten.mm, aten.bmm, aten.matmul, aten.mv, aten.dot)
def _mm(func: Any, args: Any, kwargs: Any) -> Any:
    return matmul(args[0], args[1])


@implements(aten.addmm)
def _addmm(func: Any, args: Any, kwargs: Any) -> Any:
    bias, m1, m2 = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if (
        beta == 1
        and alpha == 1
        and type(bias) is FPT
        and type(m1) is FPT
        and type(m2) is FPT
        and bias.precision_bits == m1.precision_bits == m2.precision_bits
    ):
        f = m1.precision_bits  # bias added inside the product's last step
        child = V.product(child_of(m1), child_of(m2), "matmul", (), f, child_of(bias))
        return FPT(child, f, m1.dtype)
    prod = matmul(m1, m2)
    if alpha != 1:
        prod = multiply(prod, alpha)
    if beta != 1:
        bias = multiply(bias, beta) if type(bias) is FPT else bias * beta
    return _binary_add(prod, bias, 1, False)


# ---------------------------------------------------------------------- reductions


def _dims(x: Any, dim: Any) -> list[int]:
    if dim is None:
        return list(range(x.dim()))
    if isinstance(dim, int):
        return [dim]
    return list(dim) if len(dim) else list(range(x.dim()))


def reduce_sum(x: FixedPrecisionTensor, dim: Any = None, keepdim: bool = False) -> Any:
    dtype = torch.int64 if x.dtype is torch.bool else x.dtype  # as torch: bools sum to counts
    return FPT(V.shape_op(child_of(x), "sum", _dims(x, dim), keepdim), x.precision_bits, dtype)


@implements(aten.sum.dim_IntList)
def _sum_dim(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return reduce_sum(x, dim, keepdim)


@implements(aten.sum.default)
def _sum(func: Any, args: Any, kwargs: Any) -> Any:
    return reduce_sum(args[0])


def count(x: Any, dims: list[int]) -> int:
    """How many values of ``x`` a reduction over ``dims`` combines."""
    n = 1
    for d in dims:
        n *= x.shape[d] if x.dim() else 1  # a 0-d tensor reduces over dim 0 or -1 too
    return n


def mean(x: FixedPrecisionTensor, dim: Any = None, keepdim: bool = False) -> Any:
    dims = _dims(x, dim)
    total = reduce_sum(x, dims, keepdim)
    return FPT(scale(total.child, 1.0 / count(x, dims)), x.precision_bits, x.dtype)


@implements(aten.mean.dim)
def _mean_dim(func: Any, args: Any, kwargs: Any) -> Any:
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return mean(x, dim, keepdim)


@implements(aten.mean.default)
def _mean(func: Any, args: Any, kwargs: Any) -> Any:
    return mean(args[0])


# ---------------------------------------------------------------------- comparisons


def compare(a: Any, b: Any, op: str) -> FixedPrecisionTensor:
    """``a op b`` for op in ge, gt, le, lt, eq, ne: a bool FixedPrecisionTensor (0/1)."""
    ca, cb, _, _ = fixed_pair(a, b)
    if op in ("le", "lt"):
        ca, cb = cb, ca
        op = "ge" if op == "le" else "gt"
    if op == "ge":
        bit = V.sign(V.sub(ca, cb))
    elif op == "gt":
        bit = V.sub(1, V.sign(V.sub(cb, ca)))
    else:
        d = V.sub(ca, cb)
        both = V.sign(V.cat([d, V.neg(d)], "stack", 0))
        eq = V.sub(V.add(V.shape_op(both, "select", 0, 0), V.shape_op(both, "select", 0, 1)), 1)
        bit = eq if op == "eq" else V.sub(1, eq)
    return FPT(bit, 0, torch.bool)


for _cmp in ("ge", "gt", "le", "lt", "eq", "ne"):

    def _make(op: str) -> Any:
        def handler(func: Any, args: Any, kwargs: Any) -> Any:
            return compare(args[0], args[1], op)

        return handler

    implements(getattr(aten, _cmp).Tensor, getattr(aten, _cmp).Scalar)(_make(_cmp))


__all__ = [
    "FACTOR_BITS",
    "compare",
    "count",
    "divide",
    "fixed_pair",
    "matmul",
    "mean",
    "multiply",
    "negate",
    "power",
    "reduce_sum",
    "scale",
    "scale_each",
    "wrap",
]
