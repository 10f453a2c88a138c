"""The aten-level operator registry of veil's encodings: ``@implements(aten.mm)``.

Each encoding (fixed precision, additive sharing) keeps one :class:`Registry`. A handler is
registered for an overload packet (``aten.add``: every overload) or one overload
(``aten.add.Tensor``); lookups are cached per overload, so a dispatch costs one dict access.
A registry made with ``decompose=True`` runs an unregistered, non-mutating op as torch's own
decomposition of it (``torch._decomp``: ``var`` into sums and products, ``layer_norm`` into
means and ``rsqrt``, ``leaky_relu`` into a comparison and a ``where``), whose steps dispatch
back to the registered handlers; so every step is one of the encoding's protocols. Anything
else raises ``NotImplementedError`` naming the aten op and the encoding (and, for a
decomposition, the step that is missing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from veil._errors import PrecisionOverflow

Handler = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]


class Registry:
    """aten op -> handler ``(func, args, kwargs) -> result`` for one encoding."""

    __slots__ = ("decompose", "layer", "table", "write_out")

    def __init__(
        self,
        layer: str,
        *,
        decompose: bool = False,
        write_out: Callable[[Any, Any], None] | None = None,
    ) -> None:
        self.layer = layer
        self.decompose = decompose
        #: How a result is written into an ``out=`` tensor (None: ``out=`` is refused).
        self.write_out = write_out
        self.table: dict[Any, Handler] = {}

    def implements(self, *ops: Any) -> Callable[[Handler], Handler]:
        """Decorator: register the handler for each of ``ops``."""
        if not ops:
            raise ValueError("implements() needs at least one aten op")

        def wrap(fn: Handler) -> Handler:
            for op in ops:
                self.table[op] = fn
            return fn

        return wrap

    def lookup(self, func: Any) -> Handler:
        """The handler of ``func``; raises ``NotImplementedError`` naming it if none."""
        handler = self.table.get(func)
        if handler is None:
            handler = self.table.get(getattr(func, "overloadpacket", None))
            if handler is not None and _outs(func):
                handler = self._out_variant(func, handler)
            if handler is None and self.decompose:
                handler = self._decomposition(func)
            if handler is None:
                raise NotImplementedError(
                    f"{func} is not supported on a {self.layer} (veil.mpc); supported ops: "
                    "see veil.mpc.supported_ops()"
                )
            self.table[func] = handler
        return handler

    def _out_variant(self, func: Any, functional: Handler) -> Handler:
        """The ``out=`` overload of an op registered for its whole packet: the packet's
        handler computes the result, which is then written into the ``out`` tensors (a
        handler ignoring them would leave them unchanged, silently)."""
        names = _outs(func)
        write_out, layer = self.write_out, self.layer

        def handler(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if write_out is None:
                raise NotImplementedError(f"{func} (an out= variant) on a {layer}")
            kwargs = dict(kwargs)
            targets = [kwargs.pop(n) for n in names]
            result = functional(func, args, kwargs)
            results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
            if len(results) != len(targets):
                raise NotImplementedError(f"{func}: {len(targets)} out= tensors for "
                                          f"{len(results)} results on a {layer}")
            for target, value in zip(targets, results):
                if tuple(target.shape) != tuple(value.shape):
                    raise NotImplementedError(
                        f"{func}: an out= tensor of shape {tuple(target.shape)} for a result "
                        f"of shape {tuple(value.shape)} (a {layer} cannot be resized)"
                    )
                write_out(target, value)
            return targets[0] if len(targets) == 1 else tuple(targets)

        return handler

    def _decomposition(self, func: Any) -> Handler | None:
        """A handler running torch's decomposition of ``func``, if torch has one."""
        from torch._decomp import decomposition_table

        decomposed = decomposition_table.get(func)
        if decomposed is None or func._schema.is_mutable:
            # In-place and out= decompositions write through resize_/copy_ into their
            # argument; an adaptive optimizer's addcdiv_ or lerp_ would run and then fail
            # numerically (second moments underflow the fixed point): such ops stay errors.
            return None
        layer = self.layer

        def handler(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            try:
                out = decomposed(*args, **kwargs)
            except NotImplementedError as e:
                raise NotImplementedError(
                    f"{func} runs on a {layer} as torch's decomposition of it, and a step of "
                    f"that is not supported: {e}"
                ) from e
            except PrecisionOverflow as e:  # a decomposition's own constant (inf, max float)
                raise PrecisionOverflow(
                    f"{func} runs on a {layer} as torch's decomposition of it, and a step of "
                    f"that uses a value outside the fixed-point range: {e}"
                ) from e
            if out is NotImplemented:
                raise NotImplementedError(
                    f"{func} is not supported on a {layer} (veil.mpc) with these arguments"
                )
            return out

        return handler

    def names(self) -> list[str]:
        return sorted({str(getattr(op, "_qualified_op_name", op)) for op in self.table})


def _outs(func: Any) -> tuple[str, ...]:
    """The names of ``func``'s ``out=`` arguments (none for a functional or in-place op)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return ()
    return tuple(a.name for a in schema.arguments if a.is_out)


__all__ = ["Handler", "Registry"]
