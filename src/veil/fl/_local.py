"""A worker's local training for one FedAvg round, as one command.

Driving every batch through pointers costs a handful of messages per batch; when the model
is made of allow-listed layers (so the worker holds it whole) and the loss is a known torch
loss, :func:`fedavg <veil.fl.fedavg>` instead asks each worker to run the round's SGD itself
with :func:`local_sgd`: the same torch operations on the same tensors in the same order, so
the same result, for one command per worker and round. No code travels: ``local_sgd`` is
veil's own, on the allow-list like any torch function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.pointers import _meta
from veil.pointers._tensor import PointerTensor, _dispatch
from veil.serde import Ref
from veil.workers._allowlist import register_function
from veil.workers._modules import is_allow_listed

#: Losses a worker can train with, by wire name.
LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
    "cross_entropy": F.cross_entropy,
}
LOSS_NAMES: dict[Any, str] = {fn: name for name, fn in LOSSES.items()}

WIRE_NAME = "veil.fl.local_sgd"


def local_sgd(module: nn.Module, x: Tensor, y: Tensor, orders: Tensor | None, epochs: int,
              batch_size: int, lr: float, momentum: float, prox_mu: float, loss: str
              ) -> Tensor:
    """(On the worker.) Train ``module`` in place with SGD; return its flat update.

    Exactly the loop that :func:`veil.fl.fedavg` drives through pointers: ``epochs`` passes
    over ``x, y`` in batches of ``batch_size`` (rows in order, or in the order of each row of
    ``orders``, an ``(epochs, len(x))`` permutation table), each ``zero_grad``, forward,
    ``loss`` (plus FedProx's ``prox_mu / 2 * ||w - w_start||^2`` when ``prox_mu > 0``),
    ``backward`` and ``torch.optim.SGD(lr, momentum)`` step. Returns ``w_end - w_start``
    flattened, parameter by parameter.
    """
    if not is_allow_listed(module):
        raise TypeError("veil.fl.local_sgd trains a module built from an allow-listed spec")
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.shape[:1] != y.shape[:1]:
        raise TypeError("veil.fl.local_sgd needs data and target tensors with as many rows")
    n = int(x.shape[0])
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, 0.0),
                             ("prox_mu", prox_mu, 0.0)):
        if not isinstance(value, (int, float)) or not value >= low or value != value:
            raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; one of {sorted(LOSSES)}")
    if orders is not None:
        if not isinstance(orders, Tensor) or orders.dtype != torch.int64 \
                or tuple(orders.shape) != (epochs, n):
            raise ValueError(f"orders must be an int64 tensor of shape ({epochs}, {n})")
        if n and not bool((orders.sort(dim=1).values == torch.arange(n)).all()):
            raise ValueError("each row of orders must be a permutation of the rows")
    loss_fn = LOSSES[loss]
    params = [p for p in module.parameters()]
    with torch.no_grad():
        start = [p.clone() for p in params]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    with torch.enable_grad():
        for epoch in range(epochs):
            for i in range(0, n, batch_size):
                if orders is None:
                    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                else:
                    idx = orders[epoch, i:i + batch_size]
                    xb, yb = x[idx], y[idx]
                opt.zero_grad()
                value = loss_fn(module(xb), yb)
                if prox_mu > 0:
                    prox = sum(((p - s) ** 2).sum() for p, s in zip(params, start))
                    value = value + prox * (prox_mu / 2)
                value.backward()
                opt.step()
    opt.zero_grad(set_to_none=True)  # as the caller sees it: no gradients were fetched
    with torch.no_grad():
        return torch.cat([(p - s).reshape(-1) for p, s in zip(params, start)])


# x and y (positions 1 and 2) are only trained on: the update does not inherit their
# restriction, as in the pointer loop, where it flows through autograd's .grad.
register_function(WIRE_NAME, local_sgd, training_data=(1, 2))


def train_remotely(local: nn.Module, x: PointerTensor, y: PointerTensor,
                   orders: Tensor | None, epochs: int, batch_size: int, lr: float,
                   momentum: float, prox_mu: float, loss: str) -> PointerTensor:
    """Run :func:`local_sgd` where ``local`` (a sent, whole module) and its data live."""
    remote = local._veil_remote
    size = sum(p.numel() for p in local.parameters())
    dtype = next(local.parameters()).dtype
    args = (Ref(remote.module_id), x._ref, y._ref, orders, epochs, batch_size, float(lr),
            float(momentum), float(prox_mu), loss)
    return _dispatch(remote.worker, WIRE_NAME, args, {},
                     _meta.TensorSpec(torch.Size([size]), dtype, False))


def can_train_remotely(local: nn.Module, loss_fn: Any, x: Any, y: Any) -> bool:
    """Whether :func:`train_remotely` applies: a whole sent module, a known loss, data here."""
    remote = getattr(local, "_veil_remote", None)
    return (remote is not None and remote.module_id is not None
            and _known_loss(loss_fn) is not None
            and type(x) is PointerTensor and type(y) is PointerTensor
            and x.location is remote.worker and y.location is remote.worker
            and all(p.requires_grad for p in local.parameters()))


def _known_loss(loss_fn: Any) -> str | None:
    try:
        return LOSS_NAMES.get(loss_fn)
    except TypeError:
        return None


def loss_name(loss_fn: Any) -> str:
    """The wire name of a known loss function (see :data:`LOSSES`)."""
    name = _known_loss(loss_fn)
    if name is None:
        raise ValueError(f"{loss_fn!r} is not one of the losses a worker knows")
    return name
