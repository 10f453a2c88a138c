"""The aten-level operator registry of veil's encodings: ``@implements(aten.mm)``.

Each encoding (fixed precision, additive sharing) keeps one :class:`Registry`. A handler is
registered for an overload packet (``aten.add``: every overload) or one overload
(``aten.add.Tensor``); lookups are cached per overload, so a dispatch costs one dict access.
Anything not registered raises ``NotImplementedError`` naming the aten op and the encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]


class Registry:
    """aten op -> handler ``(func, args, kwargs) -> result`` for one encoding."""

    __slots__ = ("layer", "table")

    def __init__(self, layer: str) -> None:
        self.layer = layer
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
            if handler is None:
                raise NotImplementedError(
                    f"{func} is not supported on a {self.layer} (veil.mpc); supported ops: "
                    "see veil.mpc.supported_ops()"
                )
            self.table[func] = handler
        return handler

    def names(self) -> list[str]:
        return sorted({str(getattr(op, "_qualified_op_name", op)) for op in self.table})


__all__ = ["Handler", "Registry"]
