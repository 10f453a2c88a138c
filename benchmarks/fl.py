"""FedAvg round time: veil on virtual and WebSocket workers vs local training (vs Flower).

The paper's task (Boston Housing, 13->32->24->1 MLP, SGD lr 0.001, batch 8, 2 workers, one
local epoch per round). Prints median seconds per round over repeats and the ratio to local
training of the same data and epochs, measured in the same run. The WebSocket rows use two
``veil worker`` processes started on loopback (one torch thread each, as this process uses);
the two workers train concurrently, as they would on two machines. Flower's simulation runs
when ``flwr`` (with its simulation extra) is installed; otherwise its row says so.

Run: ``python benchmarks/fl.py [--rounds 5] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.fl as fl


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 1))


def local_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    for i in range(0, len(x), 8):
        opt.zero_grad()
        F.mse_loss(model(x[i:i + 8]), y[i:i + 8]).backward()
        opt.step()


def websocket_workers() -> contextlib.AbstractContextManager[list[veil.Worker]]:
    """Two ``veil worker`` processes on loopback (alice, bob), connected; stopped afterwards."""
    return veil.net.local_workers("alice", "bob")  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-websocket", action="store_true",
                        help="skip the rows that start veil worker processes")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    torch.set_num_threads(1)
    data = veil.datasets.boston()
    x, y = data.x_train, data.y_train
    half = len(x) // 2
    local = "local training (same epochs)"
    times: dict[str, list[float]] = {local: []}
    with contextlib.ExitStack() as stack:
        kinds = {"virtual": lambda: [veil.VirtualWorker("alice"), veil.VirtualWorker("bob")]}
        if not args.no_websocket:
            conns = stack.enter_context(websocket_workers())
            kinds["WebSocket"] = lambda: conns
            # the first commands a fresh worker runs are slow: one untimed round
            fl.fedavg(mlp(), fl.federate(x, y, conns), rounds=1)
        for _ in range(args.repeats):
            model = mlp()
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                local_epoch(model, x[:half], y[:half])
                local_epoch(model, x[half:], y[half:])
            times[local].append((time.perf_counter() - t0) / args.rounds)
            for kind, make in kinds.items():
                for name, strategy in (("FedAvg", fl.FedAvg()),
                                       ("SecureFedAvg", fl.SecureFedAvg())):
                    ds = fl.federate(x, y, make())
                    hist = fl.fedavg(mlp(), ds, rounds=args.rounds, strategy=strategy)
                    times.setdefault(f"veil {name}, {kind}", []).append(
                        statistics.median(r.seconds for r in hist.rounds))
    base = statistics.median(times[local])
    print(f"FedAvg on Boston Housing, 2 workers, 1 local epoch/round, median of "
          f"{args.repeats} repeats x {args.rounds} rounds (per-round median in each repeat)")
    print(f"{'method':<34}{'ms/round':>10}{'ratio':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34}{med * 1e3:>10.1f}{med / base:>7.2f}x")
    print("target: veil's FedAvg round <= 2x local training and below Flower's")
    try:
        import flwr
    except ImportError:
        print("Flower (flwr) is not installed: no Flower row, skipped "
              "(pip install 'flwr[simulation]')")
        return
    flower = flower_round_seconds(x, y, args.rounds)
    print(f"{'Flower ' + flwr.__version__ + ' simulation':<34}{flower * 1e3:>10.1f}"
          f"{flower / base:>7.2f}x")
    print("(Flower: (time of 2R rounds - time of R rounds) / R, so start-up is not counted)")


def flower_round_seconds(x: torch.Tensor, y: torch.Tensor, rounds: int) -> float:
    """Seconds per FedAvg round of the same task in Flower's simulation engine."""
    import logging

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    half = len(x) // 2
    parts = [(x[:half], y[:half]), (x[half:], y[half:])]

    def get(model: nn.Module) -> list:
        return [p.detach().numpy().copy() for p in model.parameters()]

    class Client(NumPyClient):
        def __init__(self, cid: int):
            self.x, self.y = parts[cid]
            self.model = mlp()

        def fit(self, parameters, config):
            with torch.no_grad():
                for p, v in zip(self.model.parameters(), parameters):
                    p.copy_(torch.from_numpy(v))
            local_epoch(self.model, self.x, self.y)
            return get(self.model), len(self.x), {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    def timed(n_rounds: int) -> float:
        def server_fn(context: Context) -> ServerAppComponents:
            strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2,
                              min_available_clients=2,
                              initial_parameters=ndarrays_to_parameters(get(mlp())))
            return ServerAppComponents(strategy=strategy,
                                       config=ServerConfig(num_rounds=n_rounds))

        t0 = time.perf_counter()
        run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn),
                       num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        return time.perf_counter() - t0

    return (timed(2 * rounds) - timed(rounds)) / rounds


if __name__ == "__main__":
    main()
