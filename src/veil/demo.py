"""``veil demo``: the paper's experiments on Boston Housing and Pima Indians Diabetes.

For each dataset it trains the paper's MLP (13 or 8 -> 32 -> 24 -> 1, ReLU, SGD, batch 8,
standardized features, two workers) in every way veil offers that is installed here, and
prints one table: method, test MSE (Boston) or accuracy (Pima), time per epoch and the ratio
to plain PyTorch. It also writes a PNG of the test metric per epoch for each method.

The paper's settings: SGD lr 0.001, 10 epochs. Pima uses lr 0.05 (at lr 0.001 ten epochs
leave the model predicting the majority class) and BCE-with-logits.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import veil
import veil.fl as fl
from veil.datasets import Split


@dataclass
class Task:
    """One dataset of the paper with its model, loss and metric."""

    name: str
    data: Split
    lr: float
    loss_fn: Callable[[Any, Any], Any]
    metric_name: str

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        d = self.data.x_train.shape[1]
        return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                             nn.Linear(24, 1))

    def metric(self, model: nn.Module) -> float:
        with torch.no_grad():
            out = model(self.data.x_test)
            if self.metric_name == "accuracy":
                return ((out > 0).float() == self.data.y_test).float().mean().item()
            return F.mse_loss(out, self.data.y_test).item()


@dataclass
class Row:
    task: str
    method: str
    metric: float
    seconds_per_epoch: float
    curve: list[float] = field(default_factory=list)


def _plain(task: Task, epochs: int, workers: Any) -> tuple[nn.Module, float, list[float]]:
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    x, y = task.data.x_train, task.data.y_train
    half = len(x) // 2 + len(x) % 2
    curve, spent = [], 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for lo, hi in ((0, half), (half, len(x))):  # the same batch order as 2 workers
            for i in range(lo, hi, 8):
                j = min(i + 8, hi)
                opt.zero_grad()
                task.loss_fn(model(x[i:j]), y[i:j]).backward()
                opt.step()
        spent += time.perf_counter() - t0
        curve.append(task.metric(model))
    return model, spent / epochs, curve


def _federated(task: Task, epochs: int, workers: list[veil.Worker]
               ) -> tuple[nn.Module, float, list[float]]:
    ds = fl.federate(task.data.x_train, task.data.y_train, workers)
    loader = fl.FederatedDataLoader(ds, 8)
    model = task.model()
    curve, spent = [], 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        fl.train_sequential(model, loader, epochs=1, lr=task.lr, loss_fn=task.loss_fn)
        spent += time.perf_counter() - t0
        curve.append(task.metric(model))
    return model, spent / epochs, curve


def _fedavg(strategy: fl.Strategy) -> Callable[..., tuple[nn.Module, float, list[float]]]:
    def run(task: Task, epochs: int, workers: list[veil.Worker]
            ) -> tuple[nn.Module, float, list[float]]:
        ds = fl.federate(task.data.x_train, task.data.y_train, workers)
        model = task.model()
        curve: list[float] = []
        hist = fl.fedavg(model, ds, rounds=epochs, lr=task.lr, loss_fn=task.loss_fn,
                         strategy=strategy, on_round=lambda r, m: curve.append(task.metric(m)))
        return model, sum(r.seconds for r in hist.rounds) / epochs, curve

    return run


#: (method name, function, needs workers) in table order. Other modules add rows here.
METHODS: list[tuple[str, Callable[..., tuple[nn.Module, float, list[float]]]]] = [
    ("plain PyTorch", _plain),
    ("FL, virtual workers", _federated),
    ("FedAvg, virtual workers", _fedavg(fl.FedAvg())),
    ("FedAvg + secure aggregation", _fedavg(fl.SecureFedAvg())),
]


def run_demo(epochs: int, data_dir: str | None, out: Path | None,
             methods: list[tuple[str, Callable[..., Any]]] | None = None,
             progress: bool = True) -> list[Row]:
    """Run every method on both datasets; return the table rows (and write the plot)."""
    methods = methods or METHODS
    boston = veil.datasets.boston(data_dir)
    pima = veil.datasets.pima(data_dir)
    tasks = [Task("Boston Housing", boston, 0.001, F.mse_loss, "test MSE"),
             Task("Pima Diabetes", pima, 0.05, F.binary_cross_entropy_with_logits,
                  "accuracy")]
    rows: list[Row] = []
    bar = tqdm(total=len(tasks) * len(methods), disable=not progress, desc="veil demo",
               unit="run")
    for task in tasks:
        for name, fn in methods:
            bar.set_postfix_str(f"{task.name}: {name}")
            workers = [veil.VirtualWorker("alice"), veil.VirtualWorker("bob")]
            model, per_epoch, curve = fn(task, epochs, workers)
            rows.append(Row(task.name, name, task.metric(model), per_epoch, curve))
            bar.update()
    bar.close()
    print_table(rows, tasks)
    if out is not None:
        plot(rows, tasks, out)
    return rows


def print_table(rows: list[Row], tasks: list[Task]) -> None:
    metric_of = {t.name: t.metric_name for t in tasks}
    base = {r.task: r.seconds_per_epoch for r in rows if r.method == "plain PyTorch"}
    print(f"\n{'dataset':<16}{'method':<34}{'metric':>16}{'s/epoch':>10}{'vs plain':>10}")
    for r in rows:
        metric = f"{metric_of[r.task]} {r.metric:.3f}" if metric_of[r.task] != "accuracy" \
            else f"accuracy {r.metric:.1%}"
        ratio = r.seconds_per_epoch / base[r.task] if base.get(r.task) else float("nan")
        print(f"{r.task:<16}{r.method:<34}{metric:>16}{r.seconds_per_epoch:>10.3f}"
              f"{ratio:>9.1f}x")


def plot(rows: list[Row], tasks: list[Task], out: Path) -> None:
    """Write the test metric per epoch of every method to ``out`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {out}")
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4))
    for ax, task in zip(axes, tasks):
        styles = ["-", "--", "-.", ":"]
        mine = [r for r in rows if r.task == task.name and r.curve]
        for k, r in enumerate(mine):  # identical curves overlap: vary style and marker size
            ax.plot(range(1, len(r.curve) + 1), r.curve, styles[k % 4], marker="o",
                    markersize=8 - k, label=r.method)
        if task.metric_name != "accuracy":
            ax.set_yscale("log")
        ax.set_title(task.name)
        ax.set_xlabel("epoch (FedAvg: round)")
        ax.set_ylabel(task.metric_name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"loss curves written to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="veil demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs instead of 10")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="directory holding the CSV files")
    parser.add_argument("--out", default="out/demo.png", help="where to write the plot")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 10)
    if epochs < 1:
        parser.error("--epochs must be at least 1")
    run_demo(epochs, args.data_dir, Path(args.out), progress=not args.no_progress)


if __name__ == "__main__":
    main()
