"""The paper's Table 2: Boston Housing test MSE against epsilon, with DP-SGD in veil.

    VEIL_DATA_DIR=... python examples/dp_boston.py [--seeds 10] [--out out/dp_boston.png]

The model is the paper's MLP, 13 -> 32 -> 24 -> 1 with ReLU, trained on MSE. For each epsilon in
{0.5, 1, 2, 4, 8} (delta = 1e-5) the noise multiplier is calibrated with the PLD accountant so
that the whole run spends that epsilon; the "no DP" row trains the same model with plain SGD as
the paper did (lr 0.001, batch 8). Each cell is the mean and standard deviation over seeds (a
seed fixes the model's initialization, the Poisson batches and the noise), and the standard
error of that mean.

How far apart seeds are: at epsilon 0.5 one seed's test MSE ranges from about 18 to 60
(standard deviation about 9, driven by the noise draws far more than by the initialization),
so a mean over 5 seeds moves by +-4 with the choice of seeds. Seeds 0-4 happen to give 27.8;
seeds 0-39 give about 32.5 (0-19: 33.2, 20-39: 31.7). Settings that looked better on seeds
0-4 or 0-19 (more epochs, batch 32, longer averages, per-layer clipping, other
initializations, clipping norms 0.2-1, automatic clipping/normalization) did not hold up on
seeds 20-39: none is clearly better than these. The default is therefore 10 seeds.

DP hyperparameters (the same for every epsilon, see ``HYPER``): expected batch size 64, 100
epochs, DP-Adam (the noisy clipped gradient of DP-SGD fed to Adam) with learning rate 0.005,
clipping norm 0.5, and the reported model is an exponential moving average of the iterates
(decay 0.95), which is post-processing and free of privacy cost. Why Adam: its per-parameter
step sizes let the hidden layers learn under noise that plain SGD at one learning rate either
drowns them in or barely moves them with (measured: SGD gave test MSE ~39 even at eps = 8).

The DP model learns the target through a fixed affine map of its public range: Boston's
MEDV is documented as lying in [5, 50] (thousands of dollars, censored at 50), so the model
fits ``(y - 27.5) / 22.5`` and its predictions are mapped back. The map uses no statistic of
the training data, so it costs no privacy; without it the clipped, noisy steps cannot move
the output from 0 to the targets' scale (about 22) in any reasonable number of steps.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import veil
import veil.dp


@dataclass(frozen=True)
class Hyper:
    batch_size: int = 64  # expected batch size under Poisson sampling
    epochs: int = 100
    lr: float = 0.005
    max_grad_norm: float = 0.5
    ema: float = 0.95
    delta: float = 1e-5
    accountant: str = "pld"


HYPER = Hyper()
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 1))


#: Public range of the target (MEDV in [5, 50]): the DP model fits (y - CENTER) / SCALE.
CENTER, SCALE = 27.5, 22.5


def test_mse(model: nn.Module, split: veil.datasets.Split, scaled: bool = False) -> float:
    with torch.no_grad():
        pred = model(split.x_test)
        if scaled:
            pred = pred * SCALE + CENTER
        return nn.functional.mse_loss(pred, split.y_test).item()


def train_dp(split: veil.datasets.Split, epsilon: float, sigma: float, seed: int,
             hp: Hyper) -> tuple[float, float]:
    """Test MSE and the epsilon spent, for one seed."""
    model = make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
    engine = veil.dp.PrivacyEngine(accountant=hp.accountant, seed=seed, max_epsilon=epsilon,  # type: ignore[arg-type]
                                   delta=hp.delta)
    y = (split.y_train - CENTER) / SCALE
    loader = DataLoader(TensorDataset(split.x_train, y), batch_size=hp.batch_size)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=hp.max_grad_norm)
    average = [p.detach().clone() for p in model.parameters()]
    for _ in range(hp.epochs):
        for x, y in loader:  # Poisson batches of expected size hp.batch_size
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            with torch.no_grad():
                for a, p in zip(average, model.parameters()):
                    a.lerp_(p, 1.0 - hp.ema)
    engine.detach()
    with torch.no_grad():
        for p, a in zip(model.parameters(), average):
            p.copy_(a)
    return test_mse(model, split, scaled=True), engine.get_epsilon(hp.delta)


def train_plain(split: veil.datasets.Split, seed: int, epochs: int) -> float:
    """The paper's non-private baseline: SGD, lr 0.001, batch 8."""
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=8, shuffle=True,
                        generator=g)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    return test_mse(model, split)


def plot(rows: list[tuple[str, float, float]], baseline: tuple[float, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [float(r[0]) for r in rows]
    means = [r[1] for r in rows]
    stds = [r[2] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(eps, means, yerr=stds, marker="o", capsize=4, label="DP-SGD (veil)")
    ax.axhline(baseline[0], color="grey", linestyle="--", label="no DP")
    ax.axhspan(baseline[0] - baseline[1], baseline[0] + baseline[1], color="grey", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test MSE")
    ax.set_title("Boston Housing, MLP 13-32-24-1")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("out/dp_boston.png"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 3 epochs, two epsilons: a smoke run, not the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp, epsilons, seeds, plain_epochs = HYPER, EPSILONS, args.seeds, 100
    if args.quick:
        hp = Hyper(epochs=3, accountant="rdp")
        epsilons, seeds, plain_epochs = (0.5, 8.0), 2, 2
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    split = veil.datasets.boston()
    n = len(split.x_train)
    rate = hp.batch_size / n
    steps = hp.epochs * math.ceil(n / hp.batch_size)
    start = time.perf_counter()
    print(f"Boston Housing: {n} train / {len(split.x_test)} test rows; {seeds} seeds; "
          f"expected batch {hp.batch_size} (q = {rate:.4f}), {hp.epochs} epochs = {steps} "
          f"steps, clip {hp.max_grad_norm}, Adam lr {hp.lr}, "
          f"EMA {hp.ema}, {hp.accountant.upper()} accounting, delta {hp.delta}")
    print("| epsilon | sigma | epsilon spent | test MSE (mean +- std) | std. error |")
    print("|---|---|---|---|---|")
    rows = []
    for eps in epsilons:
        sigma = veil.dp.calibrate_noise_multiplier(eps, hp.delta, rate, steps, hp.accountant)  # type: ignore[arg-type]
        results = [train_dp(split, eps, sigma, seed, hp) for seed in range(seeds)]
        mses = [r[0] for r in results]
        spent = max(r[1] for r in results)
        mean, std = statistics.fmean(mses), statistics.stdev(mses) if seeds > 1 else 0.0
        rows.append((f"{eps:g}", mean, std))
        print(f"| {eps:g} | {sigma:.3f} | {spent:.4f} | {mean:.2f} +- {std:.2f} | "
              f"{std / math.sqrt(seeds):.2f} |", flush=True)
    plain = [train_plain(split, seed, plain_epochs) for seed in range(seeds)]
    baseline = (statistics.fmean(plain), statistics.stdev(plain) if seeds > 1 else 0.0)
    print(f"| no DP | - | - | {baseline[0]:.2f} +- {baseline[1]:.2f} | "
          f"{baseline[1] / math.sqrt(seeds):.2f} |")
    plot(rows, baseline, args.out)
    print(f"plot: {args.out}  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    if "VEIL_DATA_DIR" not in os.environ:
        print("note: set VEIL_DATA_DIR to the folder holding the Boston Housing file",
              file=sys.stderr)
    raise SystemExit(main())
