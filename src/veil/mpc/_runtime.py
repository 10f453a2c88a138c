"""Who computes what: parties, the crypto provider, and the messages between them.

A :class:`Context` names the parties that hold the shares of a value (``n >= 2``) and the
crypto provider (a dealer that never sees inputs). Parties are either workers (each share a
:class:`veil.PointerTensor` on its party's worker: the real distributed protocol) or plain
names (each share a local int64 tensor: the in-process simulation used as a test oracle).

Protocol steps are registered remote functions (``@veil.remote_function("mpc...")``) that
take one party's shares and return that party's next values, so the same code runs on local
tensors and on pointers. Between steps, :func:`exchange` delivers each party's message to
the others, worker to worker (``PointerTensor.move``): the orchestrator routes messages but
never holds a value, and no single party ever holds more than its own share.

Two parties swap messages directly; with three or more, party 0 relays (the others send it
their message, it returns to each party ``total - own``), which needs ``2(n-1)`` transfers
instead of ``n(n-1)``. Every opened value is a uniformly masked one (``x - a`` with a random
dealer mask ``a``), so the relay learns nothing the other parties do not.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from veil._errors import ProtocolError
from veil.mpc.provider import seeded_bundle
from veil.pointers import PointerTensor, call, remote_function
from veil.workers import VirtualWorker, Worker


class Stats:
    """Counters of the communication of secure computations (for benchmarks).

    ``rounds``: exchanges among the parties; ``online_bytes``: bytes of tensors moved between
    parties; ``offline_bytes``: bytes sent by the crypto provider; ``dealer_calls``: requests
    to the provider.
    """

    __slots__ = ("dealer_calls", "offline_bytes", "online_bytes", "rounds")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rounds = 0
        self.online_bytes = 0
        self.offline_bytes = 0
        self.dealer_calls = 0

    def snapshot(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return (
            f"Stats(rounds={self.rounds}, online_bytes={self.online_bytes}, "
            f"offline_bytes={self.offline_bytes}, dealer_calls={self.dealer_calls})"
        )


#: Process-wide counters; ``veil.mpc.stats()`` returns this object.
STATS = Stats()


class Context:
    """The parties holding shares of a value and their crypto provider.

    Use :func:`context` to get one: equal party lists give the same object, so values shared
    separately among the same parties can be combined.
    """

    __slots__ = (
        "__weakref__", "n", "parties", "pending", "pools", "provider", "remote", "seeded",
        "truncation",
    )

    def __init__(self, parties: tuple[Any, ...], provider: Any, truncation: str = "dealer"):
        self.parties = parties
        self.provider = provider
        self.n = len(parties)
        #: How products and divisions are truncated: ``"dealer"`` (truncation pairs, any
        #: ``n``, one round) or ``"local"`` (two parties, no round, a failure probability:
        #: see :mod:`veil.mpc.protocols.truncation`).
        self.truncation = truncation
        self.remote = isinstance(parties[0], Worker)
        #: Whether the provider deals seeds instead of random bundles (see
        #: :mod:`veil.mpc.provider`): when a party or the provider is not an in-process
        #: worker, so that bundles cost bytes on a network.
        self.seeded = self.remote and not all(
            isinstance(w, VirtualWorker) for w in (*parties, provider) if w is not None
        )
        self.pools: dict[Any, Any] = {}
        #: Products and truncations queued to run together (see :mod:`.protocols.batch`).
        self.pending: list[Any] = []

    def __repr__(self) -> str:
        names = ", ".join(_name(p) for p in self.parties)
        prov = _name(self.provider) if self.provider is not None else "none"
        mode = "" if self.truncation == "dealer" else f", truncation={self.truncation!r}"
        return f"Context(parties=[{names}], crypto_provider={prov}{mode})"

    def require_provider(self, what: str) -> Any:
        if self.provider is None:
            raise ProtocolError(
                f"{what} needs a crypto provider: share with "
                "crypto_provider=<worker> (it supplies the correlated randomness)"
            )
        return self.provider


def _name(p: Any) -> str:
    return p.name if isinstance(p, Worker) else str(p)


_CONTEXTS: weakref.WeakValueDictionary[Any, Context] = weakref.WeakValueDictionary()


#: The truncation protocols a context can use (see :mod:`veil.mpc.protocols.truncation`).
TRUNCATIONS = ("dealer", "local")


def context(parties: Sequence[Any], provider: Any = None, truncation: str = "dealer") -> Context:
    """The :class:`Context` of ``parties`` (workers, or names for local simulation).

    ``truncation``: ``"dealer"`` (the default: dealer-provided truncation pairs, correct for
    any number of parties, one round) or ``"local"`` (two parties only: each truncates its
    own share, no round and no dealer material, wrong with probability ``|z| / 2^64`` per
    value; see :mod:`veil.mpc.protocols.truncation`).

    Raises:
        veil.ProtocolError: fewer than two parties, a party listed twice, workers mixed with
            names, a provider that is also a party, an unknown ``truncation``, or
            ``"local"`` truncation with more than two parties.
    """
    parties = tuple(parties)
    if len(parties) < 2:
        raise ProtocolError(f"secret sharing needs at least 2 parties, got {len(parties)}")
    if truncation not in TRUNCATIONS:
        raise ProtocolError(
            f"truncation must be one of {', '.join(map(repr, TRUNCATIONS))}, got {truncation!r}"
        )
    if truncation == "local" and len(parties) != 2:
        raise ProtocolError(
            f"local truncation works with exactly 2 parties, got {len(parties)}: use "
            "truncation='dealer' (correct for any number of parties)"
        )
    remote = isinstance(parties[0], Worker)
    for p in parties:
        if isinstance(p, Worker) != remote or not (remote or isinstance(p, str)):
            raise ProtocolError(
                "parties must all be workers (distributed) or all be names (local "
                f"simulation); got {[type(q).__name__ for q in parties]}"
            )
    keys = tuple(id(p) for p in parties) if remote else parties
    if len(set(keys)) != len(keys):
        raise ProtocolError("a party is listed more than once")
    if provider is not None:
        if remote and not isinstance(provider, Worker):
            raise ProtocolError("the crypto provider of workers must be a worker")
        if not remote and not isinstance(provider, str):
            raise ProtocolError("the crypto provider of local parties must be a name")
        pkey = id(provider) if remote else provider
        if pkey in keys:
            raise ProtocolError(
                "the crypto provider cannot be one of the parties: it knows the triples"
            )
    else:
        pkey = None
    key = (remote, keys, pkey, truncation)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = Context(parties, provider, truncation)
        _CONTEXTS[key] = ctx
    return ctx


def merge(a: Context, b: Context) -> Context:
    """The context of a computation on values shared in ``a`` and ``b``."""
    if a is b:
        return a
    if a.truncation != b.truncation:
        raise ProtocolError(
            f"cannot combine values shared with different truncations ({a.truncation!r} and "
            f"{b.truncation!r}): share them with the same truncation=..."
        )
    if len(a.parties) == len(b.parties) and all(p is q for p, q in zip(a.parties, b.parties)):
        if b.provider is None:
            return a
        if a.provider is None:
            return b
    raise ProtocolError(
        f"cannot combine values shared among different parties or providers: {a} and {b}"
    )


# ---------------------------------------------------------------------- helpers run by parties


def nbytes(t: Any) -> int:
    n = 1
    for s in t.shape:
        n *= s
    return n * t.element_size() if not isinstance(t, PointerTensor) else n * _itemsize(t.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def opened(own: torch.Tensor, parts: tuple[torch.Tensor, ...], xor: bool = False) -> torch.Tensor:
    """The value opened by a party: its own message combined with the others' (sum or XOR)."""
    out = own
    for p in parts:
        out = out ^ p if xor else out + p
    return out


def _relay_meta(own: torch.Tensor, xor: bool, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty_like(own) for _ in others)


@remote_function("mpc.relay", meta=_relay_meta)
def relay(own: torch.Tensor, xor: bool, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Party 0's relay: for each other party ``j``, the total of all messages minus ``j``'s."""
    total = opened(own, others, xor)
    return tuple((total ^ m) if xor else (total - m) for m in others)


# ---------------------------------------------------------------------- orchestration


def exchange(ctx: Context, msgs: list[Any], *, xor: bool = False) -> list[tuple[Any, ...]]:
    """Deliver each party's message to the others; return, per party, the parts it received.

    Party ``i`` opens the value as ``opened(own_i, parts[i], xor)``. ``msgs`` are consumed
    (moved) in the distributed case: steps return their message twice, one copy to keep and
    one to send.
    """
    n = ctx.n
    size = nbytes(msgs[0])
    STATS.rounds += 1
    if not ctx.remote:
        STATS.online_bytes += size * n * (n - 1)
        return [tuple(msgs[j] for j in range(n) if j != i) for i in range(n)]
    parties = ctx.parties
    if n == 2:
        STATS.online_bytes += 2 * size
        return [(msgs[1].move(parties[0]),), (msgs[0].move(parties[1]),)]
    STATS.online_bytes += 2 * (n - 1) * size
    king = parties[0]
    gathered = tuple(msgs[j].move(king) for j in range(1, n))
    back = relay(msgs[0], xor, *gathered)
    return [gathered] + [(back[j - 1].move(parties[j]),) for j in range(1, n)]


def deal(ctx: Context, what: str, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Ask the crypto provider for one bundle per party (``fn`` runs on the provider).

    The provider's output for party ``i`` goes straight to party ``i``'s worker.
    """
    provider = ctx.require_provider(what)
    STATS.dealer_calls += 1
    if not ctx.remote:
        bundles = list(fn(*args))
    else:
        out = call(provider, fn, *args)
        bundles = [b.move(p) for b, p in zip(out, ctx.parties)]
    STATS.offline_bytes += sum(nbytes(b) for b in bundles)
    return bundles


#: A pool of dealer bundles holds at most this many bytes per party.
POOL_BYTES = 4 << 20
#: ... and at most this many bundles.
POOL_MAX = 32


def _rows_meta(bundle: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(bundle.unbind(0))


@remote_function("mpc.rows", meta=_rows_meta)
def rows(bundle: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A party's bundles of one provider request, one per protocol run (views, no copy)."""
    return tuple(bundle.unbind(0))


def _seeded_rows_meta(seed: torch.Tensor, count: int, total: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(total, dtype=torch.int64, device="meta") for _ in range(count))


@remote_function("mpc.seeded_rows", meta=_seeded_rows_meta)
def seeded_rows(seed: torch.Tensor, count: int, total: int) -> tuple[torch.Tensor, ...]:
    """Like :func:`rows`, for a party dealt a seed: its ``count`` bundles of ``total`` words,
    expanded here (see :mod:`veil.mpc.provider`)."""
    if type(count) is not int or type(total) is not int or count < 1 or total < 0:
        raise ProtocolError(f"bad bundle count or size: {count!r}, {total!r}")
    return tuple(seeded_bundle(seed, count, total).unbind(0))


def material(
    ctx: Context, what: str, fn: Callable[..., Any], args: tuple[Any, ...], words: int
) -> list[Any]:
    """Dealer material for one protocol run: one bundle (a flat int64 tensor) per party.

    Bundles are drawn from a pool per request signature: the first request asks the
    provider for one bundle, and each refill doubles the count (up to :data:`POOL_MAX` and
    :data:`POOL_BYTES`), so the repeated signatures of a training loop cost one provider
    request every few steps while one-off shapes waste nothing. Each bundle is used once:
    a party's pool is split into rows once per refill, and a run takes the next row (the
    pool then forgets it: a used row lives only as long as its run needs it).
    """
    key = (fn, args)
    pool = ctx.pools.get(key)
    if pool is None or pool[1] >= len(pool[0][0]):
        last = 0 if pool is None else len(pool[0][0])
        count = max(1, min(2 * last, POOL_MAX, POOL_BYTES // max(1, 8 * words)))
        bundles = deal(ctx, what, fn, *args, ctx.n, count, ctx.seeded)
        if not ctx.remote:
            per_party = [list(b.unbind(0)) for b in bundles]
        else:
            seeded = ctx.n - 1 if ctx.seeded else 0  # parties 0..n-2 were dealt seeds
            per_party = [
                list(seeded_rows(b, count, words) if i < seeded else rows(b))
                for i, b in enumerate(bundles)
            ]
        pool = [per_party, 0]
        ctx.pools[key] = pool
    index = pool[1]
    pool[1] = index + 1
    out = []
    for p in pool[0]:
        out.append(p[index])
        p[index] = None  # the pool lets go of a row once it is handed out
    return out


def on_party(ctx: Context, i: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run registered function ``fn`` on party ``i`` (for calls without share arguments)."""
    if ctx.remote:
        return call(ctx.parties[i], fn, *args)
    return fn(*args)


__all__ = [
    "STATS",
    "TRUNCATIONS",
    "Context",
    "Stats",
    "context",
    "deal",
    "exchange",
    "material",
    "merge",
    "on_party",
    "opened",
]
