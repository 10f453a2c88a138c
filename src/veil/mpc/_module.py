"""Fixed precision and secret sharing of whole ``nn.Module`` s.

``model.fix_precision()`` replaces every floating-point parameter and buffer by a
FixedPrecisionTensor (parameters stay ``nn.Parameter`` s, so optimizers see them);
``model.share(*parties, crypto_provider=...)`` secret-shares them; ``model.get()``
reconstructs them and ``model.float_precision()`` decodes them. Each returns the same module
object, like ``nn.Module.to``. Tied tensors stay tied.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from veil._errors import ProtocolError
from veil.mpc.encoding import DEFAULT_PRECISION
from veil.mpc.fixed import FixedPrecisionTensor, fix_precision


def _convert(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> nn.Module:
    done: dict[int, Any] = {}
    for sub in module.modules():
        for store, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for name, value in list(store.items()):
                if value is None:
                    continue
                if id(value) in done:
                    store[name] = done[id(value)]
                    continue
                new = fn(value)
                if new is None:
                    continue
                if is_param:
                    new = nn.Parameter(new, requires_grad=value.requires_grad)
                    new.__dict__.pop("_view_of", None)  # its own values, not a view's
                done[id(value)] = new
                store[name] = new
    return module


def fix_precision_module(module: nn.Module, precision_bits: int = DEFAULT_PRECISION) -> nn.Module:
    """Encode every floating-point parameter and buffer of ``module`` in fixed point."""

    def fn(t: torch.Tensor) -> torch.Tensor | None:
        if isinstance(t, FixedPrecisionTensor):
            raise ProtocolError("this module already has fixed precision")
        if not t.dtype.is_floating_point:
            return None
        return fix_precision(t.detach(), precision_bits)

    return _convert(module, fn)


def share_module(
    module: nn.Module, *parties: Any, crypto_provider: Any = None, truncation: str = "dealer"
) -> nn.Module:
    """Secret-share every fixed-precision parameter and buffer of ``module`` (``truncation``:
    see :func:`veil.mpc.share`)."""

    def fn(t: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(t, FixedPrecisionTensor):
            if t.dtype.is_floating_point:
                raise ProtocolError("call .fix_precision() on the module before .share()")
            return None
        return FixedPrecisionTensor.share(
            t.detach(), *parties, crypto_provider=crypto_provider, truncation=truncation
        )

    _convert(module, fn)
    # ``nn.Module.get`` belongs to pointers (sent modules); a shared module answers ``get``
    # itself, as an instance attribute (the class and torch are left untouched).
    object.__setattr__(module, "get", types.MethodType(get_module, module))
    return module


def get_module(module: nn.Module) -> nn.Module:
    """Reconstruct every shared parameter and buffer of ``module`` (still fixed precision).

    Raises:
        veil.PermissionDenied: a parameter derives from a worker's private data.
    """

    def fn(t: torch.Tensor) -> torch.Tensor | None:
        if isinstance(t, FixedPrecisionTensor) and t.is_shared:
            return FixedPrecisionTensor.get(t.detach())
        return None

    _convert(module, fn)
    if "get" in module.__dict__:
        object.__delattr__(module, "get")
    return module


def float_precision_module(module: nn.Module) -> nn.Module:
    """Decode every fixed-precision parameter and buffer of ``module`` to floats."""

    def fn(t: torch.Tensor) -> torch.Tensor | None:
        if isinstance(t, FixedPrecisionTensor):
            return FixedPrecisionTensor.float_precision(t.detach())
        return None

    return _convert(module, fn)


__all__ = ["fix_precision_module", "float_precision_module", "get_module", "share_module"]
