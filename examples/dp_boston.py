"""The paper's Table 2: Boston Housing test MSE against epsilon, with DP-SGD in veil.

    VEIL_DATA_DIR=... python examples/dp_boston.py [--seeds 10] [--out out/dp_boston.png]
        [--linear-share 0.3]

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
seeds 20-39: none is clearly better than these. The default is therefore 10 seeds. (Those
figures are for the random initialization with learning rate 0.005, before the linear-path
start below.)

Linear-path start (structural, free of privacy cost). The network is not started at random
but so that it computes a linear function exactly (``linear_init``): layer 1 holds the pairs
ReLU(x_k), ReLU(-x_k) for the 13 features, layer 2 two units ReLU(+-(w.x + b)), the output
their difference; the remaining 6 + 22 hidden units keep random input weights and start with
outgoing weight 0. With ``w = 0`` (the default) this uses no data, so it costs nothing, and
DP-SGD then fine-tunes every weight. Why: the noisy model underfits, and from this start the
gradient moves the linear path (the part of the target a linear model explains; non-private
linear regression gets test MSE 20.7) straight away, while the random units can still grow.
Chosen on a split of the *training* rows (324 fit / 80 validation, two splits, seeds 100-109,
never the test rows): validation MSE 48-50 against 62 for the random start at epsilon 0.5,
33 against 37 at 2, 30 against 31 at 8; the learning rate 0.003 (0.002 and 0.003 alike,
0.001 and 0.01 worse) was chosen there too, the same for every epsilon.

DP linear fit (``--linear-share``, off by default because it did not pay). ``ssp_linear``
fits ``w`` by sufficient-statistics perturbation (AdaSSP-style, Wang 2018): rows clipped to
a public L2 bound 3 on the standardized features, targets to the public range, one Gaussian
mechanism on ``sum z z^T`` (``z = [x, 1, y']``, sensitivity ``3^2 + 2``), ridge from the
noise scale. Accounting: that Gaussian mechanism gets the noise that alone would spend
``share * epsilon``; it and DP-SGD's Poisson-sampled Gaussian steps are composed as one
``dp_accounting.ComposedDpEvent`` in one accountant (PLD) and DP-SGD's noise multiplier is
found by bisection so the total is within 1e-3 below epsilon; the table's "epsilon spent"
is that composed total. With 404 rows the noise swamps the 14 x 14 Gram matrix at these
budgets: the fit is nearly the constant prediction (validation MSE ~107-120 at epsilon 0.5,
~75 at 2, against 30-34 for non-private least squares on that split), so its budget is
better left to DP-SGD (on the validation split, 20-30% shares gave 55-59 at epsilon 0.5
against 48-50 with ``w = 0``, 34-37 against 33 at 2). Measured afterwards on the test rows
(10 seeds, share 0.3): 40.3 +- 15.0 at epsilon 0.5, 22.5 at 1, 14.6 at 2, 11.6 at 4.

Table (10 seeds 0-9, test MSE mean +- std): random start, lr 0.005: 31.5 +- 8.2, 20.8, 14.9,
11.6, 9.6 for epsilon 0.5, 1, 2, 4, 8; linear-path start, lr 0.003 (the default): 29.4 +- 7.2,
17.9 +- 3.3, 13.1 +- 1.9, 10.8 +- 1.0, 9.3 +- 0.5; no DP 7.8 +- 0.6.

DP hyperparameters (the same for every epsilon, see ``HYPER``): expected batch size 64, 100
epochs, DP-Adam (the noisy clipped gradient of DP-SGD fed to Adam) with learning rate 0.003,
clipping norm 0.5, and the reported model is an exponential moving average of the iterates
(decay 0.95), which is post-processing and free of privacy cost. Why Adam: its per-parameter
step sizes let the hidden layers learn under noise that plain SGD at one learning rate either
drowns them in or barely moves them with (measured: SGD gave test MSE ~39 even at eps = 8).

The DP model learns the target through a fixed affine map of its public range: Boston's
MEDV is documented as lying in [5, 50] (thousands of dollars, censored at 50), so the model
fits ``(y - 27.5) / 22.5`` and its predictions are mapped back. The map uses no statistic of
the training data, so it costs no privacy; without it the clipped, noisy steps cannot move
the output from 0 to the targets' scale (about 22) in any reasonable number of steps.

The features are standardized by the loader with the training rows' mean and standard
deviation, as the paper did; that step is outside this accounting (the same for every row of
the table). The SSP's feature bound and the target range are public constants, not
statistics of the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dp_accounting
import dp_accounting.pld
import dp_accounting.rdp
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import veil
import veil.dp


@dataclass(frozen=True)
class Hyper:
    batch_size: int = 64  # expected batch size under Poisson sampling
    epochs: int = 100
    lr: float = 0.003
    max_grad_norm: float = 0.5
    ema: float = 0.95
    delta: float = 1e-5
    accountant: str = "pld"
    linear_init: bool = True  # start from the linear-path network (see linear_init)
    linear_share: float = 0.0  # share of epsilon for the DP linear fit (0: w = 0, no fit)
    feature_bound: float = 3.0  # public L2 bound on a row's standardized features (SSP)


HYPER = Hyper()
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 1))


def linear_init(model: nn.Sequential, w: torch.Tensor) -> None:
    """Set ``model`` (13 -> 32 -> 24 -> 1, ReLU) to compute exactly ``x @ w[:13] + w[13]``.

    Layer 1: units 2k, 2k+1 are ReLU(x_k), ReLU(-x_k) (26 of 32; the other 6 keep their random
    weights). Layer 2: unit 0 is ReLU(w.x + b), unit 1 is ReLU(-(w.x + b)), read from those
    pairs only (the other 22 units keep random inputs). Output: unit 0 - unit 1, so every
    random unit starts with outgoing weight 0. ``w = 0`` gives a constant-0 model (the public
    center) whose linear path DP-SGD can grow at once.
    """
    d = model[0].in_features
    w = w.to(model[0].weight.dtype)
    with torch.no_grad():
        l1, l2, l3 = model[0], model[2], model[4]
        l1.weight[: 2 * d].zero_()
        l1.bias[: 2 * d].zero_()
        for k in range(d):
            l1.weight[2 * k, k] = 1.0
            l1.weight[2 * k + 1, k] = -1.0
        l2.weight[:2].zero_()
        l2.weight[0, 0 : 2 * d : 2] = w[:d]
        l2.weight[0, 1 : 2 * d : 2] = -w[:d]
        l2.weight[1] = -l2.weight[0]
        l2.bias[0], l2.bias[1] = w[d], -w[d]
        l3.weight.zero_()
        l3.weight[0, 0], l3.weight[0, 1] = 1.0, -1.0
        l3.bias.zero_()


#: Public range of the target (MEDV in [5, 50]): the DP model fits (y - CENTER) / SCALE.
CENTER, SCALE = 27.5, 22.5


def test_mse(model: nn.Module, split: veil.datasets.Split, scaled: bool = False) -> float:
    with torch.no_grad():
        pred = model(split.x_test)
        if scaled:
            pred = pred * SCALE + CENTER
        return nn.functional.mse_loss(pred, split.y_test).item()


def ssp_linear(x: torch.Tensor, y: torch.Tensor, bound: float, sigma: float,
               generator: torch.Generator) -> torch.Tensor:
    """DP ridge regression by sufficient-statistics perturbation (AdaSSP-style, Wang 2018).

    Each row becomes ``z = [clip(x), 1, y']`` with ``clip`` scaling x to L2 norm <= ``bound``
    and ``y' = clamp((y - CENTER) / SCALE, -1, 1)``; ``S = sum z z^T`` has L2 (Frobenius)
    sensitivity ``||z||^2 <= bound^2 + 2`` under adding or removing a row, and its upper
    triangle gets Gaussian noise of standard deviation ``sigma * (bound^2 + 2)`` (mirrored):
    one Gaussian mechanism with noise multiplier ``sigma``. The solve adds the ridge that makes
    the noisy Gram matrix safely positive definite (about the noise matrix's spectral norm,
    less its smallest eigenvalue), which is post-processing. Returns ``[w, b]`` for y'.
    """
    n, d = x.shape
    x = x.double() * torch.clamp(bound / x.double().norm(dim=1, keepdim=True), max=1.0)
    t = ((y.double().reshape(-1) - CENTER) / SCALE).clamp(-1.0, 1.0)
    z = torch.cat([x, torch.ones(n, 1, dtype=x.dtype), t[:, None]], dim=1)
    scale = sigma * (bound**2 + 2.0)
    noise = torch.randn(d + 2, d + 2, generator=generator, dtype=x.dtype).triu() * scale
    stats = z.T @ z + noise + noise.triu(1).T
    gram, xty = stats[: d + 1, : d + 1], stats[: d + 1, d + 1]
    ridge = max(0.0, 2.0 * math.sqrt(d + 2) * scale - torch.linalg.eigvalsh(gram)[0].item())
    return torch.linalg.solve(gram + ridge * torch.eye(d + 1, dtype=x.dtype), xty).float()


def _gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier of one Gaussian mechanism spending <= epsilon (PLD)."""
    lo, hi = 0.05, 1e4
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        acc = dp_accounting.pld.PLDAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(mid))
        lo, hi = (mid, hi) if acc.get_epsilon(delta) > epsilon else (lo, mid)
    return hi


def total_epsilon(sigma_linear: float | None, sigma: float, rate: float, steps: int,
                  delta: float, accountant: str = "pld") -> float:
    """Epsilon of the linear fit's Gaussian mechanism composed with the DP-SGD steps."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    if sigma_linear is not None:
        event = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma_linear), event])
    acc = (dp_accounting.pld.PLDAccountant() if accountant == "pld"
           else dp_accounting.rdp.RdpAccountant())
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def calibrate(epsilon: float, rate: float, steps: int, hp: Hyper) -> tuple[float | None, float]:
    """(noise multiplier of the linear fit or None, DP-SGD noise multiplier) for ``epsilon``.

    The linear fit gets the Gaussian noise that alone would spend ``hp.linear_share *
    epsilon``; DP-SGD's noise is then found by bisection on the composed epsilon (one
    ``ComposedDpEvent`` in one accountant), ending within 1e-3 below the target, never above.
    """
    sigma_sgd = veil.dp.calibrate_noise_multiplier(epsilon, hp.delta, rate, steps, hp.accountant)  # type: ignore[arg-type]
    if hp.linear_share <= 0.0:
        return None, sigma_sgd
    sigma_linear = _gaussian_sigma(hp.linear_share * epsilon, hp.delta)

    def eps(sigma: float) -> float:
        return total_epsilon(sigma_linear, sigma, rate, steps, hp.delta, hp.accountant)

    hi = sigma_sgd
    while eps(hi) > epsilon:
        hi *= 1.25
    lo = hi / 1.25
    while eps(lo) <= epsilon:
        lo, hi = lo / 1.25, lo
    for _ in range(60):
        if epsilon - eps(hi) <= 1e-3:
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if eps(mid) > epsilon else (lo, mid)
    return sigma_linear, hi


def train_dp(split: veil.datasets.Split, epsilon: float, sigmas: tuple[float | None, float],
             seed: int, hp: Hyper) -> tuple[float, float]:
    """Test MSE and the epsilon spent (linear fit and DP-SGD composed), for one seed."""
    sigma_linear, sigma = sigmas
    model = make_model(seed)
    if hp.linear_init:
        w = torch.zeros(split.x_train.shape[1] + 1)
        if sigma_linear is not None:
            g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
            w = ssp_linear(split.x_train, split.y_train, hp.feature_bound, sigma_linear, g)
        linear_init(model, w)
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
    if sigma_linear is None:
        return test_mse(model, split, scaled=True), engine.get_epsilon(hp.delta)
    rate = hp.batch_size / len(split.x_train)
    return (test_mse(model, split, scaled=True),
            total_epsilon(sigma_linear, sigma, rate, engine.accountant.steps, hp.delta,
                          hp.accountant))


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
    parser.add_argument("--linear-share", type=float, default=HYPER.linear_share,
                        help="share of each epsilon for the DP linear fit (SSP) that "
                        "initializes the linear path; 0 starts it from w = 0")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp, epsilons, seeds, plain_epochs = HYPER, EPSILONS, args.seeds, 100
    if not 0.0 <= args.linear_share < 1.0:
        parser.error("--linear-share must be in [0, 1)")
    hp = dataclasses.replace(hp, linear_share=args.linear_share)
    if args.quick:
        hp = dataclasses.replace(hp, epochs=3, accountant="rdp")
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
          f"EMA {hp.ema}, {hp.accountant.upper()} accounting, delta {hp.delta}; linear-path "
          f"init, {hp.linear_share:.0%} of epsilon for its DP linear fit")
    print("| epsilon | sigma | epsilon spent | test MSE (mean +- std) | std. error |")
    print("|---|---|---|---|---|")
    rows = []
    for eps in epsilons:
        sigmas = calibrate(eps, rate, steps, hp)
        sigma = sigmas[1]
        results = [train_dp(split, eps, sigmas, seed, hp) for seed in range(seeds)]
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
