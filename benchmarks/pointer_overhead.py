"""Pointer overhead: the paper's Boston Housing training, locally and through workers.

The paper's setup (13->32->24->1 MLP, ReLU, MSE, SGD lr 0.001, batch 8, 10 epochs on the 404
training rows) is trained in the same run locally and with data and model on a worker, for
each worker kind in MODES. It prints, per kind, the median time per batch over repeats, the
ratio to plain PyTorch and the messages per batch. The paper's framework measured 46x for
virtual workers and about 66x for WebSocket workers.

Run: ``python benchmarks/pointer_overhead.py [--repeats 5] [--epochs 10] [--modes ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import veil


def paper_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 1))


def epoch(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Any, Any]]) -> None:
    """One epoch of the paper's loop (the same code for local and remote tensors)."""
    for xb, yb in batches:
        opt.zero_grad()
        loss = F.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()


def train(model: nn.Module, batches: list[tuple[Any, Any]], epochs: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    for _ in range(epochs):
        epoch(model, opt, batches)


@contextlib.contextmanager
def _virtual(serialize: bool) -> Iterator[veil.Worker]:
    yield veil.VirtualWorker("alice", serialize=serialize)


@contextlib.contextmanager
def _websocket() -> Iterator[veil.Worker]:
    """A ``veil worker`` subprocess on loopback (token, no TLS), reached with connect()."""
    from veil.net import connect, spawn_worker

    with (
        spawn_worker("alice", args=["--threads", "1"]) as proc,
        connect(proc.url, token=proc.token) as worker,
    ):
        yield worker


#: name -> context manager factory yielding a worker; more kinds may be added here.
MODES: dict[str, Callable[[], contextlib.AbstractContextManager[veil.Worker]]] = {
    "virtual": lambda: _virtual(False),
    "virtual+serialize": lambda: _virtual(True),
    "websocket": _websocket,
}


def _round_trip(worker: veil.Worker, n: int = 1000) -> float:
    """Median seconds of an empty request (``flush``) to a worker."""
    for _ in range(100):
        worker.flush()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        worker.flush()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _count(worker: veil.Worker) -> tuple[int, int]:
    """(messages, bytes) the worker handle has sent so far, where it counts them."""
    return getattr(worker, "messages", 0), getattr(worker, "bytes_sent", 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    data = veil.datasets.boston()
    x, y = data.x_train, data.y_train
    local = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]
    n_batches = len(local) * args.epochs
    torch.set_num_threads(1)

    with contextlib.ExitStack() as stack:
        workers = {m: stack.enter_context(MODES[m]()) for m in args.modes}
        remote = {m: [(a.send(w), b.send(w)) for a, b in local] for m, w in workers.items()}
        times: dict[str, list[float]] = {"plain PyTorch": []}
        counts: dict[str, tuple[float, float]] = {}
        trips: dict[str, float] = {}
        for m in workers:
            times[m] = []
        train(paper_mlp(), local, 1)  # warm-up
        for m, w in workers.items():
            train(paper_mlp().send(w), remote[m], 1)
        for _ in range(args.repeats):
            # Epochs of all kinds are interleaved so that machine noise hits them alike.
            models = {"plain PyTorch": paper_mlp()}
            for m, w in workers.items():
                models[m] = paper_mlp().send(w)
                w.flush()
            opts = {m: torch.optim.SGD(model.parameters(), lr=0.001)
                    for m, model in models.items()}
            spent = dict.fromkeys(models, 0.0)
            before = {m: _count(w) for m, w in workers.items()}
            trips_before = {m: getattr(w, "round_trips", 0) for m, w in workers.items()}
            for _ in range(args.epochs):
                for m, model in models.items():
                    batches = local if m == "plain PyTorch" else remote[m]
                    t0 = time.perf_counter()
                    epoch(model, opts[m], batches)
                    if m in workers:
                        workers[m].flush()
                    spent[m] += time.perf_counter() - t0
            for m in models:
                times[m].append(spent[m] / n_batches)
            for m, w in workers.items():
                if hasattr(w, "round_trips"):
                    trips[m] = (w.round_trips - trips_before[m]) / n_batches
                after = _count(w)
                counts[m] = ((after[0] - before[m][0]) / n_batches,
                             (after[1] - before[m][1]) / n_batches)
                models[m].get()
        latency = {m: _round_trip(w) for m, w in workers.items() if hasattr(w, "round_trips")}

    base = statistics.median(times["plain PyTorch"])
    print(f"Boston Housing MLP, batch 8, {args.epochs} epochs, median of {args.repeats} repeats")
    print(f"{'mode':<22}{'us/batch':>10}{'ratio':>8}{'msgs/batch':>12}{'bytes/batch':>13}")
    for m, ts in times.items():
        med = statistics.median(ts)
        msgs, nbytes = counts.get(m, (0.0, 0.0))
        print(f"{m:<22}{med * 1e6:>10.0f}{med / base:>7.2f}x{msgs:>12.1f}{nbytes:>13.0f}")
    for m, t in trips.items():
        print(f"{m}: {t:.2f} round trips per batch, {latency[m] * 1e6:.0f} us per round trip "
              "(median; worker in a subprocess on loopback)")
    print("the paper's framework: 46x (virtual workers), ~66x (WebSocket workers)")


if __name__ == "__main__":
    main()
