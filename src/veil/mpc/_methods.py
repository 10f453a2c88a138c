"""The methods veil.mpc adds to ``torch.Tensor`` and ``nn.Module`` (names only, never
replacing a torch attribute): ``fix_precision``, ``float_precision`` and ``share``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from veil._errors import ProtocolError
from veil.mpc import _module, fixed, sharing
from veil.mpc.encoding import DEFAULT_PRECISION


def _tensor_fix_precision(self: torch.Tensor, precision_bits: int = DEFAULT_PRECISION) -> Any:
    """Encode this float tensor in fixed point, ``precision_bits`` fractional bits (veil)."""
    return fixed.fix_precision(self, precision_bits)


def _tensor_float_precision(self: torch.Tensor) -> torch.Tensor:
    """Decode fixed-point values (veil); only fixed-precision tensors have them."""
    raise ProtocolError("float_precision() needs a fixed-precision tensor: this one is plain")


def _tensor_share(
    self: torch.Tensor, *parties: Any, crypto_provider: Any = None, truncation: str = "dealer"
) -> Any:
    """Secret-share this int64 tensor among ``parties`` (veil; see ``veil.mpc.share``)."""
    return sharing.share(self, *parties, crypto_provider=crypto_provider, truncation=truncation)


def _module_fix_precision(self: nn.Module, precision_bits: int = DEFAULT_PRECISION) -> nn.Module:
    """Encode this module's parameters and buffers in fixed point (veil)."""
    return _module.fix_precision_module(self, precision_bits)


def _module_float_precision(self: nn.Module) -> nn.Module:
    """Decode this module's fixed-point parameters and buffers (veil)."""
    return _module.float_precision_module(self)


def _module_share(
    self: nn.Module, *parties: Any, crypto_provider: Any = None, truncation: str = "dealer"
) -> nn.Module:
    """Secret-share this module's fixed-point parameters among ``parties`` (veil)."""
    return _module.share_module(
        self, *parties, crypto_provider=crypto_provider, truncation=truncation
    )


_TENSOR_METHODS = {
    "fix_precision": _tensor_fix_precision,
    "float_precision": _tensor_float_precision,
    "share": _tensor_share,
}
_MODULE_METHODS = {
    "fix_precision": _module_fix_precision,
    "float_precision": _module_float_precision,
    "share": _module_share,
}


def _add(cls: type, name: str, value: Any) -> None:
    current = cls.__dict__.get(name)
    if current is value:
        return
    if hasattr(cls, name):
        raise RuntimeError(f"{cls.__name__}.{name} already exists; veil will not replace it")
    setattr(cls, name, value)


def install() -> None:
    """Add ``fix_precision``, ``float_precision`` and ``share`` to ``torch.Tensor`` and
    ``nn.Module`` (idempotent; raises if torch itself defines one of these names)."""
    for name, fn in _TENSOR_METHODS.items():
        _add(torch.Tensor, name, fn)
    for name, fn in _MODULE_METHODS.items():
        _add(nn.Module, name, fn)


__all__ = ["install"]
