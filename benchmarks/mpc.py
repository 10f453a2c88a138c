"""SMPC benchmark: veil against plain PyTorch and CrypTen 0.4.1, measured in one run.

(a) Training the paper's Boston MLP (13 -> 32 -> 24 -> 1, ReLU, MSE, SGD lr 0.001) per batch,
    at batch 8 and 32: plain PyTorch, veil with data and model secret-shared between two
    in-process VirtualWorkers (a third one is the crypto provider), and CrypTen. Batch 8
    also runs with the parties as plain names ("no workers": shares are local tensors, the
    same protocols without the pointer and worker layer), which separates the protocols'
    own cost from the cost of simulating remote workers.
(b) A 256x256 @ 256x256 product of two shared fixed-point matrices (with truncation).
    (a) at batch 8 and (b) run twice: with veil's default truncation (dealer-provided pairs,
    exact to one unit, correct for any number of parties) and with the two-party local
    truncation (``share(..., truncation="local")``, no round, a stated failure probability:
    the protocol CrypTen uses for two parties).
(c) ReLU on 100,000 shared values.
(d) The same with CrypTen 0.4.1, if it is installed: two parties in two processes (its own
    multiprocess launcher, gloo on loopback, default trusted-first-party provider).
(e) (a) at batch 8 and (b) again with each worker a ``veil worker`` process on loopback
    (WebSocket): real parallel parties, every message serialized (``--no-network`` skips it);
    there the provider deals seeds to party 0 (``veil.mpc.provider``), so it sends half the
    bytes it deals in process.

veil defers products and truncations until their results are needed and then runs the
queued ones together (``veil.mpc.protocols.batch``); the timings force every result
they time, and a training step's last queue runs at the next step's first product.
Every timing is a median over repeats, taken after warm-up (veil's dealer pools and shape
caches filled; the pools' refills stay inside the timed loops, and matmuls are timed four
at a time so that each sample covers whole refill cycles). Rounds and bytes are per
batch or per operation: veil counts openings among parties (rounds), bytes moved between
parties (online) and bytes dealt by the provider (offline); CrypTen counts its own
communication (its trusted first party deals nothing). Also printed: the ring matmul paths
(native int64 versus float64 over limbs) and the floor they set for (b), five ring products
in one process (two per party and one at the dealer, whatever the protocol code around
them), and an estimate of veil's per-party time: all of
veil's workers share one process and one thread, so the wall time is the sum of both
parties' and the provider's work, while CrypTen's two processes run in parallel; the
estimate is the wall time minus the other party's and the provider's exclusive time
(:class:`PartyClock`), i.e. the slower party's critical path with the dealer working ahead.

Run: ``VEIL_DATA_DIR=../shared/data python benchmarks/mpc.py [--repeats 5] [--no-crypten]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.mpc
from veil.mpc import limbs

BATCHES = (8, 32)


def paper_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1)
    )


def train_steps(model: nn.Module, opt: Any, batches: list[tuple[Any, Any]]) -> None:
    for xb, yb in batches:
        opt.zero_grad()
        loss = F.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()


def median_time(fn: Callable[[], Any], repeats: int, per: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / per)
    return statistics.median(times)


class PartyClock:
    """Exclusive time each VirtualWorker spends handling messages and commands.

    Wraps the node entry points of the given workers (instance attributes, restored on
    exit): ``handle`` (messages), ``execute`` and ``_run`` (commands; in-process workers call
    ``_run`` directly) and ``delete_ids``; a call nested in another worker's (a ``move``
    delivering to a peer) is charged to the inner worker only. Work done without entering a
    node (in-process moves and in-place updates of public tensors) stays with the
    orchestrator, which makes the per-party estimate conservative.
    """

    ENTRY_POINTS = ("handle", "execute", "_run", "delete_ids")

    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers
        self.spent = {w.name: 0.0 for w in workers}
        self._stack: list[list[float]] = []

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                total = time.perf_counter() - frame[0]
                self.spent[name] += total - frame[1]
                if self._stack:
                    self._stack[-1][1] += total

        return timed

    def __enter__(self) -> PartyClock:
        for w in self.workers:
            for entry in self.ENTRY_POINTS:
                setattr(w.node, entry, self._wrap(w.name, getattr(w.node, entry)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for w in self.workers:
            for entry in self.ENTRY_POINTS:
                delattr(w.node, entry)


def per_party_time(fn: Callable[[], Any], repeats: int, parties: list[Any], provider: Any,
                   per: int = 1) -> float:
    """Median estimate of the slowest party's time if each worker ran in its own process:
    the wall time minus what the other party and the provider spent (the orchestrator's own
    work stays in, as it would on every party). An estimate for the report, not a
    measurement of a distributed run."""
    out = []
    for _ in range(repeats):
        with PartyClock([*parties, provider]) as clock:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        rest = wall - clock.spent[provider.name]
        out.append(max(rest - clock.spent[q.name] for q in parties) / per)
    return statistics.median(out)


def comm(fn: Callable[[], Any], per: int = 1) -> dict[str, float]:
    stats = veil.mpc.stats()
    stats.reset()
    fn()
    return {k: v / per for k, v in stats.snapshot().items()}


# ---------------------------------------------------------------------- veil

#: Products timed together: the dealer's pool deals one or two 256^3 triples per request (it
#: holds at most 4 MB), so a single product's time depends on whether it refilled the pool;
#: four in a row cover whole refill cycles.
POOL_CYCLE = 4

#: Result keys of the runs with local truncation (``share(..., truncation="local")``).
_SUFFIX = {"dealer": "", "local": "_local"}


def _share(alice: Any, bob: Any, carol: Any, mode: str, obj: Any) -> Any:
    """``obj`` (a tensor or module) in fixed point, shared with truncation ``mode``."""
    return obj.fix_precision().share(alice, bob, crypto_provider=carol, truncation=mode)



def bench_veil(repeats: int) -> dict[str, Any]:
    data = veil.datasets.boston()
    alice, bob, carol = (veil.VirtualWorker(n) for n in ("alice", "bob", "carol"))
    out: dict[str, Any] = {}
    runs = [(bs, "dealer", True) for bs in BATCHES] + [(8, "local", True)]
    runs += [(8, "dealer", False), (8, "local", False)]
    for bs, mode, workers in runs:
        parties = (alice, bob, carol) if workers else ("p0", "p1", "dealer")
        share = functools.partial(_share, *parties, mode)
        n = 40
        idx = [torch.arange(i * bs, (i + 1) * bs) % data.x_train.shape[0] for i in range(n)]
        plain_batches = [(data.x_train[i], data.y_train[i]) for i in idx]
        x = share(data.x_train)
        y = share(data.y_train)
        secure_batches = [
            (x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs])
            for i in range(min(n, data.x_train.shape[0] // bs))
        ]
        while len(secure_batches) < n:
            secure_batches += secure_batches[: n - len(secure_batches)]
        plain = paper_mlp()
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.001)
        secure = share(paper_mlp())
        secure_opt = torch.optim.SGD(secure.parameters(), lr=0.001)
        train_steps(plain, plain_opt, plain_batches)
        train_steps(secure, secure_opt, secure_batches * 2)  # warm-up: pools, caches
        run_plain = functools.partial(train_steps, plain, plain_opt, plain_batches)
        run_secure = functools.partial(train_steps, secure, secure_opt, secure_batches)
        tp, ts = [], []
        for _ in range(repeats):  # interleaved, so that machine noise hits both alike
            tp.append(median_time(run_plain, 1, n))
            ts.append(median_time(run_secure, 1, n))
        result = {"plain": statistics.median(tp), "veil": statistics.median(ts),
                  "comm": comm(run_secure, n)}
        if workers:
            result["party"] = per_party_time(run_secure, repeats, [alice, bob], carol, n)
        out[f"mlp{bs}" + _SUFFIX[mode] + ("" if workers else "_names")] = result

    for mode in ("dealer", "local"):
        a = _share(alice, bob, carol, mode, torch.randn(256, 256))
        b = _share(alice, bob, carol, mode, torch.randn(256, 256))

        def products(a: Any = a, b: Any = b) -> None:
            for _ in range(POOL_CYCLE):
                (a @ b).child.shares  # noqa: B018 (products are deferred: run it now)

        products()
        out["matmul" + _SUFFIX[mode]] = {
            "veil": median_time(products, repeats, POOL_CYCLE),
            "comm": comm(products, POOL_CYCLE),
            "party": per_party_time(products, repeats, [alice, bob], carol, POOL_CYCLE),
        }
    v = torch.randn(100_000).fix_precision().share(alice, bob, crypto_provider=carol)
    for _ in range(2):
        torch.relu(v)
    out["relu"] = {
        "veil": median_time(lambda: torch.relu(v), repeats),
        "comm": comm(lambda: torch.relu(v)),
        "party": per_party_time(lambda: torch.relu(v), repeats, [alice, bob], carol),
    }

    ia = torch.randint(-(2**62), 2**62, (256, 256))
    ib = torch.randint(-(2**62), 2**62, (256, 256))
    out["ring"] = {
        "int64": median_time(lambda: torch.matmul(ia, ib), repeats),
        "limbs": median_time(lambda: limbs.limb_matmul(ia, ib), repeats),
        "float64": median_time(lambda: ia.double() @ ib.double(), repeats),
    }
    return out


# ---------------------------------------------------------------------- network


def bench_network(repeats: int) -> dict[str, Any]:
    """(a) at batch 8 and (b) with each worker a separate ``veil worker`` process on loopback
    (WebSocket, authenticated): real parallel parties, as CrypTen's two processes are, with
    every share, mask and dealer bundle serialized and sent. Each timing ends with a flush of
    every worker, so it covers the work, not only its sending."""
    data = veil.datasets.boston()
    with veil.net.local_workers("alice", "bob", "carol") as workers:
        alice, bob, carol = workers

        def done() -> None:
            for w in workers:
                w.flush()

        out: dict[str, Any] = {}
        for mode, suffix in _SUFFIX.items():
            share = functools.partial(_share, alice, bob, carol, mode)
            x, y, model = share(data.x_train[:8]), share(data.y_train[:8]), share(paper_mlp())
            opt = torch.optim.SGD(model.parameters(), lr=0.001)

            def step(model: Any = model, opt: Any = opt, x: Any = x, y: Any = y) -> None:
                train_steps(model, opt, [(x, y)])
                done()

            a, b = share(torch.randn(256, 256)), share(torch.randn(256, 256))

            def products(a: Any = a, b: Any = b) -> None:
                for _ in range(POOL_CYCLE):
                    (a @ b).child.shares  # noqa: B018 (forces the deferred product)
                done()

            for _ in range(3):
                step()
            products()
            out["mlp8" + suffix] = median_time(step, repeats * 2)
            out["matmul" + suffix] = median_time(products, repeats, POOL_CYCLE)
            out[f"mlp8{suffix}_comm"] = comm(lambda step=step: [step() for _ in range(40)], 40)
            out[f"matmul{suffix}_comm"] = comm(products, POOL_CYCLE)
        return out


# ---------------------------------------------------------------------- CrypTen


def _import_crypten() -> Any:
    """Import CrypTen 0.4.1 on torch 2.13 (its ONNX converter imports a module torch no longer
    has; an empty stand-in is enough for everything benchmarked here)."""
    name = "torch.onnx._internal.registration"
    if name not in sys.modules:
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.registry = None  # type: ignore[attr-defined]
            sys.modules[name] = stub
    import crypten

    return crypten


def _crypten_party(repeats: int) -> dict[str, Any]:
    crypten = _import_crypten()
    import crypten.communicator as comm_mod
    import crypten.nn as cnn

    torch.set_num_threads(1)
    rank = comm_mod.get().get_rank()
    data = veil.datasets.boston()
    results: dict[str, Any] = {}

    def counted(fn: Callable[[], Any], per: int = 1) -> dict[str, float]:
        c = comm_mod.get()
        crypten.cfg.communicator.verbose = True
        c.reset_communication_stats()
        fn()
        stats = c.get_communication_stats()
        crypten.cfg.communicator.verbose = False
        return {"rounds": stats["rounds"] / per, "online_bytes": stats["bytes"] / per}

    for bs in BATCHES:
        n = 10
        xs = [crypten.cryptensor(data.x_train[i * bs : (i + 1) * bs]) for i in range(n)]
        ys = [crypten.cryptensor(data.y_train[i * bs : (i + 1) * bs]) for i in range(n)]
        model = cnn.Sequential(
            cnn.Linear(13, 32), cnn.ReLU(), cnn.Linear(32, 24), cnn.ReLU(), cnn.Linear(24, 1)
        )
        model.encrypt()
        model.train()
        loss_fn = cnn.MSELoss()

        def steps(model=model, xs=xs, ys=ys, loss_fn=loss_fn) -> None:
            for xb, yb in zip(xs, ys):
                model.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                model.update_parameters(0.001)

        steps()
        results[f"mlp{bs}"] = {"time": median_time(steps, repeats, n), "comm": counted(steps, n)}

    a = crypten.cryptensor(torch.randn(256, 256))
    b = crypten.cryptensor(torch.randn(256, 256))
    a.matmul(b)
    results["matmul"] = {
        "time": median_time(lambda: a.matmul(b), repeats),
        "comm": counted(lambda: a.matmul(b)),
    }
    v = crypten.cryptensor(torch.randn(100_000))
    v.relu()
    results["relu"] = {
        "time": median_time(lambda: v.relu(), repeats),
        "comm": counted(lambda: v.relu()),
    }
    return results if rank == 0 else {}


def bench_crypten(repeats: int) -> dict[str, Any] | None:
    try:
        crypten = _import_crypten()
    except ImportError:
        return None
    from crypten.mpc import context

    version = getattr(crypten, "__version__", "?")
    runner = context.run_multiprocess(world_size=2)(_crypten_party)
    results = runner(repeats)
    if not results:
        return None
    out = results[0]
    out["version"] = version
    return out


# ---------------------------------------------------------------------- report


#: Report rows: result key, label, the CrypTen result it is compared with.
_ROWS = [
    *[(f"mlp{bs}", f"MLP train, batch {bs}", f"mlp{bs}") for bs in BATCHES],
    ("mlp8_local", "  batch 8, local trunc.", "mlp8"),
    ("mlp8_names", "  batch 8, no workers", "mlp8"),
    ("mlp8_local_names", "  local, no workers", "mlp8"),
    ("matmul", "matmul 256x256x256", "matmul"),
    ("matmul_local", "  local truncation", "matmul"),
    ("relu", "ReLU 100,000", "relu"),
]


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024:
            return f"{b:.0f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"


def report(v: dict[str, Any], c: dict[str, Any] | None,
           net: dict[str, Any] | None = None) -> None:
    print(
        "veil: parties are in-process VirtualWorkers (2 parties + a crypto provider); "
        "timings are medians"
    )
    if c:
        print(f"CrypTen {c['version']}: 2 processes (gloo on loopback, trusted first party)")
    print()
    print(
        f"{'task':<26}{'plain':>10}{'veil':>11}{'veil/plain':>12}"
        f"{'CrypTen':>11}{'CrypTen/veil':>14}"
    )
    rows = _ROWS
    for key, label, ckey in rows:
        r = v[key]
        ct = c[ckey]["time"] if c else None
        line = f"{label:<26}"
        line += f"{r['plain'] * 1e3:>8.3f}ms" if "plain" in r else f"{'':>10}"
        line += f"{r['veil'] * 1e3:>9.2f}ms"
        line += f"{r['veil'] / r['plain']:>11.1f}x" if "plain" in r else f"{'':>12}"
        print(line + (f"{ct * 1e3:>9.1f}ms{ct / r['veil']:>13.1f}x" if c else ""))
    print()
    print("estimated per-party time (wall minus the other party's and the provider's work):")
    for key, label, ckey in [row for row in rows if "party" in v[row[0]]]:
        r = v[key]
        line = f"  {label:<24}{r['party'] * 1e3:>9.2f}ms"
        if "plain" in r:
            line += f"{r['party'] / r['plain']:>8.1f}x plain"
        if c:
            line += f"{c[ckey]['time'] / r['party']:>8.1f}x faster than CrypTen"
        print(line)
    print()
    print(
        f"{'communication':<26}{'veil rounds':>12}{'online':>11}{'offline':>11}"
        f"{'CrypTen rounds':>16}{'bytes':>11}"
    )
    for key, label, ckey in [row for row in rows if not row[0].endswith("_names")]:
        m = v[key]["comm"]
        line = (
            f"{label:<26}{m['rounds']:>12.0f}{_fmt_bytes(m['online_bytes']):>11}"
            f"{_fmt_bytes(m['offline_bytes']):>11}"
        )
        if c:
            cm = c[ckey]["comm"]
            line += f"{cm['rounds']:>16.0f}{_fmt_bytes(cm['online_bytes']):>11}"
        print(line)
    if net:
        print()
        print("veil with each worker in its own process (WebSocket on loopback, serialized):")
        for key, label, ckey in [row for row in rows if row[0] in net]:
            line = f"  {label:<24}{net[key] * 1e3:>9.2f}ms"
            if key.startswith("mlp"):
                line += f"{net[key] / v[ckey]['plain']:>8.1f}x plain"
            if c:
                line += f"   CrypTen / veil {c[ckey]['time'] / net[key]:.2f}x"
            m = net[key + "_comm"]
            line += (f"   online {_fmt_bytes(m['online_bytes'])}, dealt "
                     f"{_fmt_bytes(m['offline_bytes'])} (seeded)")
            print(line)
    ring = v["ring"]
    print()
    print(
        f"ring matmul 256^3 (exact mod 2^64): int64 {ring['int64'] * 1e3:.2f} ms, float64 "
        f"limbs {ring['limbs'] * 1e3:.2f} ms, one float64 GEMM {ring['float64'] * 1e3:.2f} ms "
        f"-> veil uses {limbs.BACKEND}"
    )
    # The floor any Beaver product of two shared matrices has here, whatever the protocol
    # code around it: each party multiplies twice (eps @ b_i, a_i @ delta) and the dealer
    # once (a @ b), each an exact ring product.
    best = min(ring["int64"], ring["limbs"])
    line = (f"floor for a shared 256^3 product: 5 ring matmuls = {5 * best * 1e3:.2f} ms in one "
            f"process, 2 = {2 * best * 1e3:.2f} ms per party")
    if c:
        ct = c["matmul"]["time"]
        line += f" -> at most {ct / (5 * best):.1f}x / {ct / (2 * best):.1f}x faster than CrypTen"
    print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-crypten", action="store_true")
    parser.add_argument("--no-network", action="store_true",
                        help="skip the run with workers in separate processes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    crypten_results = None if args.no_crypten else bench_crypten(args.repeats)
    veil_results = bench_veil(args.repeats)
    network = None if args.no_network else bench_network(args.repeats)
    report(veil_results, crypten_results, network)


if __name__ == "__main__":
    main()
