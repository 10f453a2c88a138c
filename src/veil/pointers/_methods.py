"""The methods veil adds to ``torch.Tensor`` and ``nn.Module`` on import.

They only add names torch does not define; an existing attribute is never replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from veil.pointers import _api


def _tensor_send(self: torch.Tensor, worker: Any) -> Any:
    """Send this tensor to ``worker``; return a pointer to it (veil)."""
    return _api.send(self, worker)


def _module_send(self: nn.Module, worker: Any) -> nn.Module:
    """Send this module to ``worker``: its tensors become pointers (veil)."""
    return _api.send(self, worker)


def _module_get(self: nn.Module) -> nn.Module:
    """Bring this sent module home (veil)."""
    return _api.get(self)


_TENSOR_METHODS = {"send": _tensor_send}
_MODULE_METHODS = {"send": _module_send, "get": _module_get}


def _add(cls: type, name: str, value: Any) -> None:
    current = cls.__dict__.get(name)
    if current is value:
        return
    if hasattr(cls, name):
        raise RuntimeError(f"{cls.__name__}.{name} already exists; veil will not replace it")
    setattr(cls, name, value)


def install() -> None:
    """Add veil's methods to ``torch.Tensor`` and ``nn.Module`` (idempotent)."""
    for name, fn in _TENSOR_METHODS.items():
        _add(torch.Tensor, name, fn)
    for name, fn in _MODULE_METHODS.items():
        _add(nn.Module, name, fn)
