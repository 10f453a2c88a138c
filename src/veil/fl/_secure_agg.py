"""Secure aggregation: summing client updates through additive secret sharing.

Protocol (honest-but-curious parties, no collusion between a client and the aggregator):

1. Each client ``i`` encodes its weighted update ``n_i * delta_i`` in fixed point (a ring
   element of Z_2^64 held in int64) and splits it into ``k`` additive shares, one per
   client, drawn from the operating system's CSPRNG: ``k - 1`` uniform shares and a last
   share that makes them sum to the encoding (mod 2^64).
2. Client ``i`` keeps share ``i`` and moves share ``j`` straight to client ``j``
   (worker to worker: it never passes through the aggregator).
3. Each client ``j`` adds the shares it holds and the aggregator takes only these sums.
   Any ``k - 1`` shares are uniform and independent of the update, so each sum is a
   uniform mask; together they add up to ``sum_i n_i * delta_i`` and nothing more.
4. The aggregator decodes the total and divides by ``sum_i n_i``.

The result equals plain FedAvg up to the fixed-point rounding of step 1: at most
``2^-precision_bits / 2`` per coordinate and client, before the division.
"""

from __future__ import annotations

import secrets

import torch

from veil._errors import PrecisionOverflow, ProtocolError
from veil.pointers import PointerTensor, remote_function

#: Encodings must stay below this in absolute value so sums of many clients cannot wrap.
_LIMIT = 2**55


def _random_ring(shape: torch.Size) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    raw = bytearray(secrets.token_bytes(8 * n))
    return torch.frombuffer(raw, dtype=torch.int64).reshape(shape).clone()


def _split_meta(update: torch.Tensor, weight: float, parties: int,
                precision_bits: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(update.shape, dtype=torch.int64, device="meta")
                 for _ in range(parties))


@remote_function("fl.encode_and_split", meta=_split_meta)
def encode_and_split(update: torch.Tensor, weight: float, parties: int,
                     precision_bits: int) -> tuple[torch.Tensor, ...]:
    """Fixed-point encode ``weight * update`` and split it into ``parties`` additive shares."""
    if not isinstance(parties, int) or parties < 2:
        raise ProtocolError(f"secure aggregation needs at least 2 parties, got {parties!r}")
    if not isinstance(precision_bits, int) or not 0 <= precision_bits <= 40:
        raise ValueError(f"precision_bits must be an int in [0, 40], got {precision_bits!r}")
    scaled = update.detach().double() * float(weight) * float(2**precision_bits)
    if not torch.isfinite(scaled).all() or scaled.abs().max() >= _LIMIT:
        raise PrecisionOverflow(
            f"a weighted update does not fit the fixed-point range (|value| * 2^{precision_bits}"
            f" must stay below 2^55)")
    encoded = torch.round(scaled).to(torch.int64)
    shares = [_random_ring(encoded.shape) for _ in range(parties - 1)]
    last = encoded.clone()
    for s in shares:
        last -= s  # wraps mod 2^64
    return (*shares, last)


@remote_function("fl.sum_shares")
def sum_shares(*shares: torch.Tensor) -> torch.Tensor:
    """The sum (mod 2^64) of the shares a party holds."""
    if not shares or any(s.dtype != torch.int64 for s in shares):
        raise ProtocolError("sum_shares needs one or more int64 shares")
    total = shares[0].clone()
    for s in shares[1:]:
        total += s
    return total


def secure_sum(updates: list[PointerTensor], weights: list[float],
               precision_bits: int = 24) -> torch.Tensor:
    """``sum_i weights[i] * updates[i]`` (float64), computed without revealing any update.

    ``updates[i]`` is a pointer to client ``i``'s flat update, on its own worker.
    """
    k = len(updates)
    if k < 2:
        raise ProtocolError("secure aggregation needs updates from at least 2 workers")
    workers = [u.location for u in updates]
    if len({id(w) for w in workers}) != k:
        raise ProtocolError("secure aggregation needs each update on a different worker")
    held: list[list[PointerTensor]] = [[] for _ in range(k)]
    for i, (u, w) in enumerate(zip(updates, weights)):
        shares = encode_and_split(u, float(w), k, precision_bits)
        for j, share in enumerate(shares):
            held[j].append(share if j == i else share.move(workers[j]))
    for w in workers:  # every share has reached its party before anyone sums
        w.flush()
    sums = [sum_shares(*held[j]) for j in range(k)]
    total = torch.zeros(updates[0].shape, dtype=torch.int64)
    for s in sums:
        total += s.get()
    return total.double() / float(2**precision_bits)
