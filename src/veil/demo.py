"""``veil demo``: the paper's experiments on Boston Housing and Pima Indians Diabetes.

For each dataset it trains the paper's MLP (13 or 8 -> 32 -> 24 -> 1, ReLU, SGD, batch 8,
standardized features, two workers, alice and bob) in every way veil offers, and prints one
table: method, test MSE (Boston) or accuracy (Pima), the privacy spent where there is DP, time
per epoch and the ratio to plain PyTorch. It also writes a PNG of the test metric per epoch of
each method.

The rows:

* plain PyTorch: the centralized baseline (the same batches, in the same order, as the two
  workers' data visited in turn);
* FL, virtual / WebSocket workers: the paper's loop (:func:`veil.fl.train_sequential`); the
  WebSocket rows use two ``veil worker`` processes that the demo starts on 127.0.0.1 at free
  ports with a fresh token, and stops at the end;
* FedAvg, virtual / WebSocket workers, and FedAvg + secure aggregation: one local epoch a
  round;
* SMPC training: data, targets and model secret-shared between alice and bob, with carol as
  the crypto provider; ``torch.optim.SGD`` trains the shared model; the metric is computed on
  the secret-shared test set, revealed at the end of each epoch;
* DP-SGD on workers at epsilon 0.5 and 1 (delta 1e-5), and the same run without noise: each
  worker runs DP-SGD on its own rows in one remote call a round
  (:func:`veil.fl.private_fedavg`), the orchestrator averages; the table reports the
  example-level epsilon actually spent.

The paper's settings: SGD lr 0.001, 10 epochs. Pima uses lr 0.03 (at lr 0.001 ten epochs
leave the model predicting the majority class) and BCE-with-logits. The SMPC row for Pima
trains the same network on MSE against targets of -1/+1 (a least-squares classifier, lr
0.0075, the same decision rule ``output > 0``): veil.mpc has no BCE-with-logits, and its
sigmoid approximation does not yet run on shares held by workers.

DP rows use their own schedule (DP-SGD needs larger batches, more epochs and clipped steps): 5
rounds of 20 local epochs, expected batch 32 per worker, clipping norm 0.5, the model returned
by each worker being the moving average (decay 0.95) of its iterates. Boston trains with
DP-Adam (lr 0.005) on the target's public range: MEDV is documented to lie in [5, 50], so the
workers fit ``(y - 27.5) / 22.5`` (a fixed map, no privacy cost) and the model starts out
predicting the middle of that range; these are the settings of ``examples/dp_boston.py``.
Pima keeps DP-SGD with lr 0.05 on the hidden layers and 0.5 on the output layer (DP-Adam left
it predicting the majority class). The settings are the same at every epsilon and the noise
is seeded, so the rows are reproducible. ``--quick`` shortens the other rows to 2 epochs but
runs every row.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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

#: The DP rows' delta, and their schedule (see the module docstring).
DP_DELTA = 1e-5
DP_ROUNDS, DP_LOCAL_EPOCHS, DP_BATCH, DP_CLIP, DP_EMA = 5, 20, 32, 0.5, 0.95
#: Seed of the DP rows' noise and batches (reproducible rows; see private_fedavg).
DP_SEED = 0


@dataclass
class Task:
    """One dataset of the paper with its model, loss and metric.

    ``smpc_targets`` maps the training targets for the SMPC row, which always trains on MSE
    (``smpc_lr`` is its learning rate); ``dp_loss`` names the loss for
    :func:`veil.fl.dp_sgd_mlp`, ``dp_optimizer`` its optimizer, ``dp_lr_hidden`` and
    ``dp_lr_output`` the DP rows' learning rates, and ``dp_target_range`` a public
    ``(low, high)`` range of the targets that the DP rows fit through a fixed affine map.
    """

    name: str
    data: Split
    lr: float
    loss_fn: Callable[[Any, Any], Any]
    metric_name: str
    smpc_lr: float
    dp_loss: str
    dp_lr_output: float
    smpc_targets: Callable[[torch.Tensor], torch.Tensor] = lambda y: y
    dp_optimizer: str = "sgd"
    dp_lr_hidden: float = 0.05
    dp_target_range: tuple[float, float] | None = None

    @property
    def widths(self) -> list[int]:
        return [int(self.data.x_train.shape[1]), 32, 24, 1]

    def model(self, seed: int = 0) -> nn.Sequential:
        """The paper's MLP, initialized from ``seed``."""
        torch.manual_seed(seed)
        return fl.mlp(self.widths)

    def score(self, out: torch.Tensor) -> float:
        """The metric of test-set outputs: accuracy of ``out > 0``, or MSE."""
        if self.metric_name == "accuracy":
            return ((out > 0).float() == self.data.y_test).float().mean().item()
        return F.mse_loss(out, self.data.y_test).item()

    def metric(self, model: nn.Module) -> float:
        with torch.no_grad():
            return self.score(model(self.data.x_test))


def tasks(data_dir: str | None = None) -> list[Task]:
    """The paper's two tasks, with the settings described in the module docstring."""
    return [
        Task("Boston Housing", veil.datasets.boston(data_dir), 0.001, F.mse_loss, "test MSE",
             smpc_lr=0.001, dp_loss="mse", dp_lr_output=0.005, dp_optimizer="adam",
             dp_lr_hidden=0.005, dp_target_range=(5.0, 50.0)),
        Task("Pima Diabetes", veil.datasets.pima(data_dir), 0.03,
             F.binary_cross_entropy_with_logits, "accuracy", smpc_lr=0.0075,
             dp_loss="bce_with_logits", dp_lr_output=0.5, smpc_targets=lambda y: 2 * y - 1),
    ]


@dataclass
class Outcome:
    """What one method did on one task."""

    metric: float
    seconds_per_epoch: float
    curve: list[float] = field(default_factory=list)
    epsilon: float | None = None


@dataclass
class Row:
    """One line of the table."""

    task: str
    method: str
    metric: float
    seconds_per_epoch: float
    curve: list[float] = field(default_factory=list)
    epsilon: float | None = None


class Workers:
    """The workers the rows train on: virtual ones made fresh for each row, and two
    ``veil worker`` processes (alice and bob) on loopback, started once in the background and
    stopped by :meth:`close`.
    """

    def __init__(self) -> None:
        self.token = veil.net.new_token()
        self._pool = ThreadPoolExecutor(2)
        self._procs: list[Future[veil.net.WorkerProcess]] = []
        self._warm = False

    def virtual(self, *names: str) -> list[veil.Worker]:
        return [veil.VirtualWorker(n) for n in names]

    def start_websocket(self) -> None:
        """Start the worker processes without waiting for them (they take a few seconds)."""
        if not self._procs:
            self._procs = [self._pool.submit(veil.net.spawn_worker, name, token=self.token,
                                             args=["--threads", "1"])
                           for name in ("alice", "bob")]

    @contextlib.contextmanager
    def websocket(self) -> Iterator[list[veil.Worker]]:
        """Fresh connections to the two worker processes, closed afterwards (the workers then
        release everything the row left there)."""
        self.start_websocket()
        procs = [f.result() for f in self._procs]
        conns = [veil.connect(p.url, token=self.token, timeout=60) for p in procs]
        try:
            if not self._warm:  # the first commands a worker runs are slow: not timed
                for w in conns:
                    model = fl.mlp([2, 2, 1]).send(w)
                    F.mse_loss(model(torch.ones(1, 2).send(w)), torch.ones(1, 1).send(w)
                               ).backward()
                    model.get()
                self._warm = True
            yield conns
        finally:
            for w in conns:
                w.close()

    def close(self) -> None:
        """Stop the worker processes (those that started)."""
        for f in self._procs:
            with contextlib.suppress(Exception):
                f.result().stop()
        self._procs = []
        self._pool.shutdown(wait=False)


Method = Callable[[Task, int, Workers], Outcome]


def _batches(n: int) -> Iterator[tuple[int, int]]:
    """The paper's batches of 8 over the two workers' halves in turn (as federate() splits)."""
    half = n // 2 + n % 2
    for lo, hi in ((0, half), (half, n)):
        for i in range(lo, hi, 8):
            yield i, min(i + 8, hi)


def _plain(task: Task, epochs: int, workers: Workers) -> Outcome:
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    x, y = task.data.x_train, task.data.y_train
    curve, spent = [], 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for i, j in _batches(len(x)):
            opt.zero_grad()
            task.loss_fn(model(x[i:j]), y[i:j]).backward()
            opt.step()
        spent += time.perf_counter() - t0
        curve.append(task.metric(model))
    return Outcome(curve[-1], spent / epochs, curve)


def _sequential(task: Task, epochs: int, ws: list[veil.Worker]) -> Outcome:
    ds = fl.federate(task.data.x_train, task.data.y_train, ws)
    loader = fl.FederatedDataLoader(ds, 8)
    model = task.model()
    curve, spent = [], 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        fl.train_sequential(model, loader, epochs=1, lr=task.lr, loss_fn=task.loss_fn)
        spent += time.perf_counter() - t0
        curve.append(task.metric(model))
    return Outcome(curve[-1], spent / epochs, curve)


def _fedavg_on(task: Task, epochs: int, ws: list[veil.Worker],
               strategy: fl.Strategy) -> Outcome:
    ds = fl.federate(task.data.x_train, task.data.y_train, ws)
    model = task.model()
    curve: list[float] = []
    hist = fl.fedavg(model, ds, rounds=epochs, lr=task.lr, loss_fn=task.loss_fn,
                     strategy=strategy, on_round=lambda r, m: curve.append(task.metric(m)))
    return Outcome(curve[-1], sum(r.seconds for r in hist.rounds) / epochs, curve)


def _federated(task: Task, epochs: int, workers: Workers) -> Outcome:
    return _sequential(task, epochs, workers.virtual("alice", "bob"))


def _federated_websocket(task: Task, epochs: int, workers: Workers) -> Outcome:
    with workers.websocket() as ws:
        return _sequential(task, epochs, ws)


def _fedavg(strategy: Callable[[], fl.Strategy], websocket: bool = False) -> Method:
    def run(task: Task, epochs: int, workers: Workers) -> Outcome:
        if websocket:
            with workers.websocket() as ws:
                return _fedavg_on(task, epochs, ws, strategy())
        return _fedavg_on(task, epochs, workers.virtual("alice", "bob"), strategy())

    return run


def _smpc(task: Task, epochs: int, workers: Workers) -> Outcome:
    """Train on secret-shared data with a secret-shared model (examples/secure_boston.py)."""
    import veil.mpc  # noqa: F401  (installs fix_precision() and share())

    alice, bob, carol = workers.virtual("alice", "bob", "carol")

    def share(t: Any) -> Any:
        return t.fix_precision().share(alice, bob, crypto_provider=carol)

    x, y = share(task.data.x_train), share(task.smpc_targets(task.data.y_train))
    x_test = share(task.data.x_test)
    model = share(task.model())
    opt = torch.optim.SGD(model.parameters(), lr=task.smpc_lr)
    curve, spent = [], 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for i, j in _batches(int(x.shape[0])):
            opt.zero_grad()
            F.mse_loss(model(x[i:j]), y[i:j]).backward()
            opt.step()
        spent += time.perf_counter() - t0
        with torch.no_grad():
            curve.append(task.score(model(x_test).get().float_precision()))
    return Outcome(curve[-1], spent / epochs, curve)


def _dp(target_epsilon: float | None) -> Method:
    def run(task: Task, epochs: int, workers: Workers) -> Outcome:
        ds = fl.federate(task.data.x_train, task.data.y_train, workers.virtual("alice", "bob"))
        model = task.model()
        center, scale = 0.0, 1.0
        if task.dp_target_range is not None:
            low, high = task.dp_target_range
            center, scale = (low + high) / 2, (high - low) / 2
            with torch.no_grad():  # start from the usual init in the scaled target space
                model[-1].weight.mul_(scale)
                model[-1].bias.mul_(scale).add_(center)
        curve: list[float] = []
        noise = {"target_epsilon": target_epsilon} if target_epsilon else \
            {"noise_multiplier": 0.0}
        result = fl.private_fedavg(
            model, ds, rounds=DP_ROUNDS, local_epochs=DP_LOCAL_EPOCHS, batch_size=DP_BATCH,
            lr_hidden=task.dp_lr_hidden, lr_output=task.dp_lr_output, max_grad_norm=DP_CLIP,
            delta=DP_DELTA, loss=task.dp_loss, ema=DP_EMA, optimizer=task.dp_optimizer,
            target_center=center, target_scale=scale, seed=DP_SEED,
            on_round=lambda r, m: curve.append(task.metric(m)), **noise)  # type: ignore[arg-type]
        per_epoch = sum(result.round_seconds) / (DP_ROUNDS * DP_LOCAL_EPOCHS)
        return Outcome(curve[-1], per_epoch, curve, result.epsilon)

    return run


#: (method name, function) in table order. Other modules may add rows here.
METHODS: list[tuple[str, Method]] = [
    ("plain PyTorch", _plain),
    ("FL, virtual workers", _federated),
    ("FL, WebSocket workers", _federated_websocket),
    ("FedAvg, virtual workers", _fedavg(fl.FedAvg)),
    ("FedAvg, WebSocket workers", _fedavg(fl.FedAvg, websocket=True)),
    ("FedAvg + secure aggregation", _fedavg(fl.SecureFedAvg)),
    ("SMPC training", _smpc),
    ("DP-SGD on workers, eps=0.5", _dp(0.5)),
    ("DP-SGD on workers, eps=1", _dp(1.0)),
    ("DP-SGD on workers, no noise", _dp(None)),
]


def run_demo(epochs: int, data_dir: str | None, out: Path | None,
             methods: list[tuple[str, Method]] | None = None,
             progress: bool = True) -> list[Row]:
    """Run every method on both datasets; print the table, write the plot, return the rows.

    ``epochs`` is the paper's rows' number of epochs (FedAvg: rounds); the DP rows keep
    their own schedule. The WebSocket workers, if any row needs them, start in the background
    at once and are stopped before this returns, also on error.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    methods = METHODS if methods is None else methods
    the_tasks = tasks(data_dir)
    rows: list[Row] = []
    workers = Workers()
    bar = tqdm(total=len(the_tasks) * len(methods), disable=not progress, desc="veil demo",
               unit="run")
    try:
        if any("WebSocket" in name for name, _ in methods):
            workers.start_websocket()
        for task in the_tasks:
            for name, fn in methods:
                bar.set_postfix_str(f"{task.name}: {name}")
                o = fn(task, epochs, workers)
                rows.append(Row(task.name, name, o.metric, o.seconds_per_epoch, o.curve,
                                o.epsilon))
                bar.update()
    finally:
        bar.close()
        workers.close()
    print_table(rows, the_tasks)
    if out is not None:
        plot(rows, the_tasks, out)
    return rows


def format_table(rows: list[Row], tasks: list[Task]) -> str:
    """The table as text, one line per row."""
    metric_of = {t.name: t.metric_name for t in tasks}
    base = {r.task: r.seconds_per_epoch for r in rows if r.method == "plain PyTorch"}
    lines = [f"{'dataset':<16}{'method':<30}{'metric':>17}{'epsilon':>9}{'s/epoch':>9}"
             f"{'vs plain':>10}"]
    for r in rows:
        metric = f"accuracy {r.metric:.1%}" if metric_of[r.task] == "accuracy" \
            else f"{metric_of[r.task]} {r.metric:.3f}"
        eps = "" if r.epsilon is None else "inf" if r.epsilon == float("inf") \
            else f"{r.epsilon:.3f}"
        ratio = r.seconds_per_epoch / base[r.task] if base.get(r.task) else float("nan")
        lines.append(f"{r.task:<16}{r.method:<30}{metric:>17}{eps:>9}"
                     f"{r.seconds_per_epoch:>9.3f}{ratio:>9.1f}x")
    return "\n".join(lines)


def print_table(rows: list[Row], tasks: list[Task]) -> None:
    """Print :func:`format_table` with a note on the columns."""
    print("\n" + format_table(rows, tasks))
    print(f"epsilon: example-level, at delta {DP_DELTA:g} (DP rows only). s/epoch: training "
          "time per epoch over the data (FedAvg: per round), evaluation excluded.")


def plot(rows: list[Row], tasks: list[Task], out: Path) -> None:
    """Write the test metric per epoch of every method to ``out`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {out}")
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.5))
    for ax, task in zip(axes, tasks):
        styles = ["-", "--", "-.", ":"]
        mine = [r for r in rows if r.task == task.name and r.curve]
        for k, r in enumerate(mine):  # identical curves overlap: vary style and marker size
            ax.plot(range(1, len(r.curve) + 1), r.curve, styles[k % 4], marker="o",
                    markersize=max(2, 9 - k), label=r.method)
        if task.metric_name != "accuracy":
            ax.set_yscale("log")
        ax.set_title(task.name)
        ax.set_xlabel("epoch (FedAvg and DP: round)")
        ax.set_ylabel(task.metric_name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"loss curves written to {out}")


def main(argv: list[str] | None = None) -> None:
    """``veil demo [--quick] [--epochs N] [--data-dir D] [--out PNG] [--no-progress]``."""
    parser = argparse.ArgumentParser(prog="veil demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs instead of 10 (every row still runs)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="directory holding the CSV files")
    parser.add_argument("--out", default="out/demo.png", help="where to write the plot")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    if epochs < 1:
        parser.error("--epochs must be at least 1")
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    run_demo(epochs, args.data_dir, Path(args.out), progress=not args.no_progress)


if __name__ == "__main__":
    main()
