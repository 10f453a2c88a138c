"""The pointer API as plain functions, and remote functions of veil's own."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from veil._errors import ProtocolError
from veil.pointers._module import get_module, send_module
from veil.pointers._tensor import PointerTensor, run_remote
from veil.workers._allowlist import register_function
from veil.workers._base import Worker, new_id
from veil.workers._messages import StoreObject

F = TypeVar("F", bound=Callable[..., Any])


def send(obj: Any, worker: Worker) -> Any:
    """Send a tensor (returns a :class:`PointerTensor`) or a module (returns it, sent)."""
    if not isinstance(worker, Worker):
        raise TypeError(f"send() needs a worker, got {type(worker).__name__}")
    if isinstance(obj, nn.Module):
        return send_module(obj, worker)
    if type(obj) is PointerTensor:
        return obj.send(worker)
    if type(obj) is not torch.Tensor and type(obj) is not nn.Parameter:
        raise TypeError(f"send() takes a torch.Tensor or an nn.Module, got {type(obj).__name__}")
    oid = new_id()
    rg = bool(obj.requires_grad)
    worker._command(StoreObject(oid, obj.detach().requires_grad_(rg) if rg else obj.detach()))
    return PointerTensor._from_remote(worker, oid, obj.shape, obj.dtype, rg, owns=True)


def get(obj: Any) -> Any:
    """Bring a pointer's value or a sent module home."""
    if isinstance(obj, nn.Module):
        return get_module(obj)
    if type(obj) is PointerTensor:
        return obj.get()
    raise TypeError(f"get() takes a pointer or a sent module, got {type(obj).__name__}")


def move(obj: PointerTensor, worker: Worker) -> PointerTensor:
    """Send a pointer's value straight to ``worker`` (see :meth:`PointerTensor.move`)."""
    if type(obj) is not PointerTensor:
        raise TypeError(f"move() takes a pointer, got {type(obj).__name__}")
    return obj.move(worker)


def remote_function(name: str, *, meta: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """Register a veil function that workers may run; calls with pointers run remotely.

    The decorated function takes and returns plain tensors (or tuples of them). Called with
    :class:`PointerTensor` arguments, all on one worker, it runs on that worker as one command
    and returns pointers. Output shapes are found by running ``meta`` (default: the function
    itself) on meta tensors, cached per input signature.
    """
    if not name or not isinstance(name, str):
        raise ValueError("a remote function needs a non-empty name")

    def wrap(fn: F) -> F:
        wire = name if name.startswith("veil.") else f"veil.{name}"
        register_function(wire, fn)
        shape_fn = meta or fn

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _has_pointer(args) and not _has_pointer(tuple(kwargs.values())):
                return fn(*args, **kwargs)
            return _call_registered(wire, shape_fn, None, args, kwargs)

        wrapper.wire_name = wire  # type: ignore[attr-defined]
        wrapper.shape_fn = shape_fn  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return wrap


def _has_pointer(values: tuple[Any, ...] | list[Any]) -> bool:
    """Whether a pointer is among ``values``, also inside (nested) tuples and lists."""
    for v in values:
        t = type(v)
        if t is PointerTensor or ((t is tuple or t is list) and _has_pointer(v)):
            return True
    return False


def _call_registered(wire: str, shape_fn: Callable[..., Any], location: Worker | None,
                     args: Any, kwargs: dict[str, Any]) -> Any:
    return run_remote(wire, shape_fn, args, kwargs, location)


def call(worker: Worker, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the remote function ``fn`` on ``worker`` (for calls with no pointer arguments)."""
    wire = getattr(fn, "wire_name", None)
    if wire is None:
        raise ProtocolError(f"{getattr(fn, '__name__', fn)!r} is not a veil remote function")
    if not isinstance(worker, Worker):
        raise TypeError(f"call() needs a worker, got {type(worker).__name__}")
    return _call_registered(wire, fn.shape_fn, worker, args, kwargs)
