"""Pointers: local stand-ins for tensors and models that live on workers."""

from veil.pointers._api import call, get, move, remote_function, send
from veil.pointers._module import get_module, send_module
from veil.pointers._tensor import PointerTensor, refresh_grads

__all__ = [
    "PointerTensor",
    "call",
    "get",
    "get_module",
    "move",
    "refresh_grads",
    "remote_function",
    "send",
    "send_module",
]
