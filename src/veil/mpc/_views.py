"""Views of FixedPrecisionTensors (and of AdditiveSharingTensors), and writes through them.

A torch view shares its base's memory: ``x[0] = 5``, ``x[:, 1].add_(1)`` or
``out.narrow(1, 0, 2).copy_(y)`` change ``x`` (``out``), and a view taken earlier sees what
was written into its base. A FixedPrecisionTensor holds its values in ``child`` (int64
encodings or their shares), an AdditiveSharingTensor in its shares, and a view's values are
new ones computed from the base's, so writes would stay in the view. This module keeps
torch's semantics:

* a view records its *root* (the first tensor of the chain that is not itself a view) and
  the chain of view ops from the root (``(name, args)`` of :data:`~veil.mpc.sharing.LOCAL_OPS`);
  the root keeps weak references to its live views;
* after an in-place op on a view, :func:`written` puts the view's new values back into the
  root, op by op from the view up the chain (``slice_scatter``, ``select_scatter`` and
  ``diagonal_scatter`` for slices, a reshape or the inverse permutation for the others:
  all linear and local to each party, so shares stay shares and nothing is revealed);
* after any write into a root (directly or through a view), every live view of it is
  recomputed from the root's new values.

A write into an expanded or unfolded view (where one element appears more than once) raises
``NotImplementedError``, as torch refuses most such writes. ``reshape`` always gives a view
here, where torch copies a non-contiguous input (its documentation says to rely on neither).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc._runtime import merge
from veil.mpc.sharing import AdditiveSharingTensor

AST = AdditiveSharingTensor

#: View ops whose result is the same elements in another shape: written back by a reshape.
_RESHAPES = frozenset(
    {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "squeeze.dim", "squeeze.dims"}
)
#: View ops whose result is a subset of the elements: written back by a scatter.
_SCATTERS = {"slice": "slice_scatter", "select": "select_scatter", "diagonal": "diagonal_scatter"}
#: View ops that reorder the dims: written back by the inverse permutation.
_PERMUTES = frozenset({"t", "transpose", "permute"})
#: View ops that repeat elements: a write through them is refused.
_REPEATS = frozenset({"expand", "unfold"})

#: Every view op tracked (the others, like ``flip`` or ``index_select``, copy in torch too).
VIEW_OPS = _RESHAPES | _PERMUTES | _REPEATS | frozenset(_SCATTERS) | {"alias"}

#: The in-place view ops (``squeeze_``, ``t_``, ...): they change a tensor's shape, not its
#: values (their handlers call :func:`reshaped`).
SHAPE_WRITES = frozenset(op for _, op in V.INPLACE_SHAPE_OPS)

#: Whether an op writes into its first argument's values (filled per op on first use).
_WRITES: dict[Any, bool] = {}

#: Dead weak references a root may hold before they are swept.
_SWEEP = 32


def record(out: Any, base: Any, name: str, args: tuple[Any, ...]) -> Any:
    """Note that ``out`` is the view ``name(base, *args)``; return ``out``."""
    link = base.__dict__.get("_view_of")
    if link is None:
        root, chain = base, ((name, args),)
    else:
        root, chain = link[0], (*link[1], (name, args))
    out._view_of = (root, chain)
    views = root.__dict__.get("_views")
    if views is None:
        root._views = [weakref.ref(out)]
    else:
        if len(views) >= _SWEEP:
            views[:] = [r for r in views if r() is not None]
        views.append(weakref.ref(out))
    return out


def _get(t: Any) -> Any:
    """The values of a FixedPrecisionTensor (its child) or of an AdditiveSharingTensor
    (itself)."""
    return t if type(t) is AST else t.child


def _set(t: Any, value: Any) -> None:
    if type(t) is AST:
        if type(value) is not AST:  # public values written into shares: party 0 holds them
            value = V.add(V.mul_int(t, 0), value)
        t.shares, t.ctx = value.shares, value.ctx
    else:
        t.child = value
        t.__dict__.pop("cache", None)


def _forward(child: Any, name: str, args: tuple[Any, ...]) -> Any:
    return child if name == "alias" else V.shape_op(child, name, *args)


def _apply(child: Any, chain: tuple[tuple[str, tuple[Any, ...]], ...]) -> Any:
    for name, args in chain:
        child = _forward(child, name, args)
    return child


def scatter(base: Any, src: Any, name: str, args: tuple[Any, ...]) -> Any:
    """``name(base, src, *args)`` for a local scatter op (``slice_scatter``, ``index_put``,
    ...): share-wise when shared, a public operand counting as party 0's share and zeros
    for the others."""
    sb, ss = type(base) is AST, type(src) is AST
    if not sb and not ss:
        return V.shape_op(base, name, src, *args)
    ctx = base.ctx if not ss else src.ctx if not sb else merge(base.ctx, src.ctx)
    n = ctx.n
    bases = base.shares if sb else [base] + [base.new_zeros(base.shape)] * (n - 1)
    srcs = src.shares if ss else [src] + [src.new_zeros(src.shape)] * (n - 1)
    return AST(V.apply_each(ctx, name, [(b, s, *args) for b, s in zip(bases, srcs)]), ctx)


def _put_back(old: Any, new: Any, name: str, args: tuple[Any, ...]) -> Any:
    """The value of the tensor ``old`` once its view ``name(old, *args)`` holds ``new``."""
    if name in _SCATTERS:
        return scatter(old, new, _SCATTERS[name], args)
    if name in _RESHAPES:
        return V.shape_op(new, "reshape", list(old.shape))
    if name == "t":
        return V.shape_op(new, "t")
    if name == "transpose":
        return V.shape_op(new, "transpose", *args)
    if name == "permute":
        dims = [d % len(args[0]) for d in args[0]]
        return V.shape_op(new, "permute", [dims.index(i) for i in range(len(dims))])
    if name == "alias":
        return new
    raise NotImplementedError(
        f"an in-place write into a view made by {name!r} of a FixedPrecisionTensor (one "
        "element appears more than once in it); write into a .clone() instead"
    )


def sync(func: Any, args: tuple[Any, ...]) -> None:
    """After the aten op ``func`` ran on a wrapper (fixed-point or shared): if it wrote into
    its first argument's values and that is a view or has views, carry the write over
    (:func:`written`). The dispatch of both wrappers calls this."""
    writes = _WRITES.get(func)
    if writes is None:
        writes = _WRITES[func] = func._schema.is_mutable and func not in SHAPE_WRITES
    if writes:
        x = args[0]
        if isinstance(x, torch.Tensor) and ("_view_of" in x.__dict__ or "_views" in x.__dict__):
            written(x)


def written(x: Any) -> None:
    """``x`` was just changed in place: carry the change to its root and to the root's
    other views."""
    link = x.__dict__.get("_view_of")
    if link is None:
        if x.__dict__.get("_views"):
            _refresh(x, skip=None)
        return
    root, chain = link
    # The values of each view along the chain, from the root: olds[k] is the tensor that
    # chain[k] is applied to.
    olds = [_get(root)]
    for name, args in chain[:-1]:
        olds.append(_forward(olds[-1], name, args))
    new = _get(x)
    for (name, args), old in zip(reversed(chain), reversed(olds)):
        new = _put_back(old, new, name, args)
    _set(root, new)
    _refresh(root, skip=x)


def _refresh(root: Any, skip: Any) -> None:
    for ref in root.__dict__.get("_views", ()):
        view = ref()
        if view is None or view is skip or view.__dict__.get("_view_of", (None,))[0] is not root:
            continue
        _set(view, _apply(_get(root), view._view_of[1]))


def reshaped(x: Any, name: str, args: tuple[Any, ...], old_shape: tuple[int, ...]) -> None:
    """``x`` just took the in-place view op ``name`` (``squeeze_``, ``t_``, ...): its own
    chain grows by that op; a root's views are re-expressed from its new shape."""
    link = x.__dict__.get("_view_of")
    if link is not None:
        x._view_of = (link[0], (*link[1], (name, args)))
        return
    if name in ("t", "transpose"):
        back: tuple[str, tuple[Any, ...]] = (name, args)
    else:
        back = ("reshape", (list(old_shape),))
    for ref in x.__dict__.get("_views", ()):
        view = ref()
        if view is not None and view.__dict__.get("_view_of", (None,))[0] is x:
            view._view_of = (x, (back, *view._view_of[1]))


__all__ = ["SHAPE_WRITES", "VIEW_OPS", "record", "reshaped", "scatter", "sync", "written"]
