"""FixedPrecisionTensor: real numbers as fixed-point integers of Z_2^64, float outside.

A :class:`FixedPrecisionTensor` tells torch it is a float tensor (so autograd, ``nn``
layers and optimizers drive it unchanged) while it holds ``child``: the int64 encodings
``round(x * 2^f)`` (see :mod:`veil.mpc.encoding`). The child is one of

* a plain int64 tensor: plaintext fixed-point arithmetic (the oracle of the SMPC tests);
* an :class:`~veil.mpc.sharing.AdditiveSharingTensor`: the encodings secret-shared among
  parties; every operation runs the secure protocols;
* a :class:`veil.PointerTensor`: encodings held by one worker, ready to be shared from there.

Every aten operation that reaches the wrapper is looked up in one registry
(:data:`OPS`, ``@OPS.implements(aten.mm)``); anything else raises ``NotImplementedError``
naming the op. Products truncate back to ``f`` fractional bits. Comparisons return a
FixedPrecisionTensor of dtype ``bool`` with ``precision_bits == 0`` (integers 0/1).
"""

from __future__ import annotations

from typing import Any

import torch

from veil._errors import ProtocolError
from veil.mpc import _views, encoding, sharing
from veil.mpc._registry import Registry
from veil.mpc.encoding import DEFAULT_PRECISION, check_precision
from veil.mpc.sharing import AdditiveSharingTensor
from veil.pointers import PointerTensor, remote_function


def _write_out(target: Any, value: Any) -> None:
    target.copy_(value)  # a plain target gets copy_'s TypeError


#: The aten-level operations of :class:`FixedPrecisionTensor`.
OPS = Registry("FixedPrecisionTensor", decompose=True, write_out=_write_out)


class FixedPrecisionTensor(torch.Tensor):
    """Fixed-point values with ``precision_bits`` fractional bits, held in ``child``.

    Create with ``tensor.fix_precision(precision_bits=16)``; ``.share(*parties,
    crypto_provider=...)`` secret-shares the encodings, ``.get()`` reconstructs them and
    ``.float_precision()`` decodes to a float tensor.
    """

    child: Any
    precision_bits: int

    @staticmethod
    def __new__(
        cls,
        child: Any,
        precision_bits: int = DEFAULT_PRECISION,
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = False,
    ) -> FixedPrecisionTensor:
        out = torch.Tensor._make_wrapper_subclass(
            cls, child.shape, dtype=dtype, device="cpu", requires_grad=requires_grad
        )
        out.child = child
        out.precision_bits = precision_bits
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = OPS.lookup(func)(func, args, kwargs or {})
        _views.sync(func, args)  # a write into a view reaches its base, and the base's views
        return out

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        child = self.child
        if type(child) is AdditiveSharingTensor or type(child) is PointerTensor:
            inner = repr(child)
        else:
            inner = (
                f"value={self.float_precision().tolist()}"
                if child.numel() <= 16
                else f"shape={tuple(child.shape)}"
            )
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"FixedPrecisionTensor(precision_bits={self.precision_bits}, {inner}{grad})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("fixed-precision tensors cannot be pickled")

    @property
    def is_shared(self) -> bool:
        """Whether the encodings are secret-shared."""
        return type(self.child) is AdditiveSharingTensor

    def float_precision(self) -> torch.Tensor:
        """Decode to a plain float tensor (``bool`` for comparison results).

        Raises:
            veil.ProtocolError: the values are shared or remote: ``.get()`` them first.
        """
        child = self.child
        if type(child) is AdditiveSharingTensor:
            raise ProtocolError(
                "these values are secret-shared: call .get() before .float_precision()"
            )
        if type(child) is PointerTensor:
            raise ProtocolError("these values are on a worker: call .get() first")
        if self.dtype == torch.bool:
            return child != 0
        return encoding.decode(child, self.precision_bits, self.dtype)

    def get(self) -> FixedPrecisionTensor:
        """Bring the encodings home: reconstruct shares or fetch from the worker.

        Raises:
            veil.PermissionDenied: the values derive from a worker's private data.
        """
        child = self.child
        if type(child) is AdditiveSharingTensor or type(child) is PointerTensor:
            child = child.get()
        return FixedPrecisionTensor(child, self.precision_bits, self.dtype)

    def share(
        self, *parties: Any, crypto_provider: Any = None, truncation: str = "dealer"
    ) -> FixedPrecisionTensor:
        """Secret-share the encodings among ``parties`` (see :func:`veil.mpc.share`, which
        also explains ``truncation``)."""
        out = FixedPrecisionTensor(
            sharing.share(
                self.child, *parties, crypto_provider=crypto_provider, truncation=truncation
            ),
            self.precision_bits,
            self.dtype,
            requires_grad=self.requires_grad,
        )
        return out

    def refresh(self) -> FixedPrecisionTensor:
        """The same values with freshly randomised shares."""
        if type(self.child) is not AdditiveSharingTensor:
            raise ProtocolError("only shared values can be refreshed")
        return FixedPrecisionTensor(
            self.child.refresh(), self.precision_bits, self.dtype, requires_grad=self.requires_grad
        )

    def fix_precision(self, precision_bits: int = DEFAULT_PRECISION) -> FixedPrecisionTensor:
        raise ProtocolError("this tensor already has fixed precision")


def _encode_meta(x: torch.Tensor, precision_bits: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int64, device="meta")


@remote_function("mpc.encode", meta=_encode_meta)
def encode_remote(x: torch.Tensor, precision_bits: int) -> torch.Tensor:
    """Worker side of ``pointer.fix_precision()``: encode the worker's tensor."""
    return encoding.encode(x, precision_bits)


def fix_precision(x: torch.Tensor, precision_bits: int = DEFAULT_PRECISION) -> FixedPrecisionTensor:
    """Encode float tensor ``x`` with ``precision_bits`` fractional bits.

    A pointer is encoded on its worker (the caller never sees the values).

    Raises:
        veil.PrecisionOverflow: a value is outside the representable range or not finite.
    """
    check_precision(precision_bits)
    if type(x) is PointerTensor:
        if not x.dtype.is_floating_point:
            raise TypeError(f"fix_precision() takes a float tensor, got {x.dtype}")
        return FixedPrecisionTensor(encode_remote(x, precision_bits), precision_bits, x.dtype)
    if isinstance(x, (FixedPrecisionTensor, AdditiveSharingTensor)):
        raise ProtocolError(f"this {type(x).__name__} cannot be encoded again")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fix_precision() takes a tensor, got {type(x).__name__}")
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    return FixedPrecisionTensor(
        encoding.encode(x.detach(), precision_bits),
        precision_bits,
        dtype,
        requires_grad=x.requires_grad,
    )


__all__ = ["OPS", "FixedPrecisionTensor", "encode_remote", "fix_precision"]
