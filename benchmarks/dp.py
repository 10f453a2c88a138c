"""DP-SGD step time: plain SGD vs veil vs torch.func vs Opacus, measured in one run.

    VEIL_DATA_DIR=... python benchmarks/dp.py [--repeats 15] [--threads 1] [--quick]
        [--table2 SEEDS]

Each row is one model and batch size. Every method trains its own copy of the model on the
same fixed batch (sampling is left out for all of them) with SGD, and one "step" is
``zero_grad`` + forward + MSE loss + ``backward`` + ``step``:

* plain: ``torch.optim.SGD``, no privacy;
* veil: ``veil.dp.PrivacyEngine.make_private`` (hooks, ghost norms for linear layers);
* func: per-sample gradients by ``torch.func.vmap(grad(...))`` with the same clipping and
  noise (written here, to show why veil uses hooks);
* opacus-hooks / opacus-ew / opacus-ghost: Opacus 1.6's modes, if Opacus is installed.

Methods are interleaved round by round so that load on the machine hits them alike; the table
gives the median time per step over the rounds and the ratio to plain SGD's median. The last
column is Opacus's best mode divided by veil.

``--table2 SEEDS`` then prints the paper's Table 2 (Boston Housing test MSE against epsilon,
mean and standard deviation over SEEDS seeds, and its PNG) by running
``examples/dp_boston.py``, whose docstring explains the training.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import veil.dp

Step = Callable[[], None]


def small_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1)
    )


def big_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(13, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
    )


SIGMA, CLIP, LR = 1.0, 1.0, 1e-3


def plain_step(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor) -> Step:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    return step


def veil_step(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor) -> Step:
    model = make()
    engine = veil.dp.PrivacyEngine(seed=0)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
    )

    def step() -> None:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    return step


def func_step(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor) -> Step:
    from torch.func import functional_call, grad, vmap

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    batch = len(x)

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step() -> None:
        opt.zero_grad()
        detached = {k: v.detach() for k, v in params.items()}
        gs = per_sample(detached, x, y)
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in gs.values()]), dim=0
        )
        factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
        for name, p in params.items():
            summed = torch.tensordot(factor, gs[name], dims=1)
            noise = torch.normal(0.0, SIGMA * CLIP, p.shape, generator=gen)
            p.grad = (summed + noise) / batch
        opt.step()

    return step


def opacus_steps(
    make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor
) -> dict[str, Step]:
    try:
        import opacus  # noqa: F401
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
        from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError:
        return {}
    batch = len(x)
    steps: dict[str, Step] = {}
    for mode, cls in (
        ("opacus-hooks", GradSampleModule),
        ("opacus-ew", GradSampleModuleExpandedWeights),
    ):
        gsm = cls(make())
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=batch,
        )

        def step(gsm: nn.Module = gsm, opt: DPOptimizer = opt) -> None:
            opt.zero_grad()
            F.mse_loss(gsm(x), y).backward()
            opt.step()

        steps[mode] = step
    gsm = GradSampleModuleFastGradientClipping(make(), max_grad_norm=CLIP, use_ghost_clipping=True)
    ghost_opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=batch,
    )
    criterion = DPLossFastGradientClipping(gsm, ghost_opt, nn.MSELoss())

    def ghost_step() -> None:
        ghost_opt.zero_grad()
        criterion(gsm(x), y).backward()
        ghost_opt.step()

    steps["opacus-ghost"] = ghost_step
    return steps


def measure(steps: dict[str, Step], repeats: int, budget_s: float) -> dict[str, float]:
    """Median seconds per step of each method, interleaved round by round."""
    for step in steps.values():  # warm up, and size the rounds
        for _ in range(20):
            step()
    per_round: dict[str, int] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(10):
            step()
        each = (time.perf_counter() - start) / 10
        per_round[name] = max(3, int(budget_s / max(each, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            n = per_round[name]
            start = time.perf_counter()
            for _ in range(n):
                step()
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--round-ms", type=float, default=40.0, help="time per method a round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="few rounds, small rows only")
    parser.add_argument("--no-opacus", action="store_true", help="skip Opacus")
    parser.add_argument("--table2", type=int, default=0, metavar="SEEDS",
                        help="also print the paper's Table 2 over SEEDS seeds (>= 2)")
    parser.add_argument("--table2-out", type=Path, default=Path("out/dp_boston.png"))
    args = parser.parse_args(argv)
    if args.table2 == 1 or args.table2 < 0:
        parser.error("--table2 needs at least 2 seeds (a standard deviation)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus warns about secure mode and more
    rows = [
        ("13-32-24-1", small_mlp, 8),
        ("13-32-24-1", small_mlp, 32),
        ("13-32-24-1", small_mlp, 128),
        ("13-256-256-1", big_mlp, 32),
        ("13-256-256-1", big_mlp, 128),
    ]
    repeats = args.repeats
    if args.quick:
        rows, repeats = rows[1:2], 3
    have_opacus = not args.no_opacus and bool(
        opacus_steps(small_mlp, torch.zeros(2, 13), torch.zeros(2, 1))
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), python "
        f"{sys.version.split()[0]}; median of {repeats} interleaved rounds"
    )
    if not have_opacus:
        print(
            "Opacus not installed (pip install 'opacus==1.6.*' --no-deps): its columns are skipped"
        )
    header = ["model", "batch", "plain us", "veil", "func"]
    if have_opacus:
        header += ["opacus-hooks", "opacus-ew", "opacus-ghost", "best opacus / veil"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, make, batch in rows:
        torch.manual_seed(0)
        x, y = torch.randn(batch, 13), torch.randn(batch, 1)
        steps = {
            "plain": plain_step(make, x, y),
            "veil": veil_step(make, x, y),
            "func": func_step(make, x, y),
        }
        if have_opacus:
            steps.update(opacus_steps(make, x, y))
        med = measure(steps, repeats, args.round_ms / 1000)
        base = med["plain"]
        cells = [label, str(batch), f"{base * 1e6:.0f}"]
        for name in list(steps)[1:]:
            cells.append(f"{med[name] * 1e6:.0f} us ({med[name] / base:.2f}x)")
        if have_opacus:
            best = min(med[k] for k in med if k.startswith("opacus"))
            cells.append(f"{best / med['veil']:.2f}x")
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.table2:
        print()
        return table2(args.table2, args.table2_out, args.threads)
    return 0


def table2(seeds: int, out: Path, threads: int) -> int:
    """Run examples/dp_boston.py's table (it is a script, not a module of the package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "dp_boston.py"
    spec = importlib.util.spec_from_file_location("dp_boston", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dp_boston"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return int(module.main(["--seeds", str(seeds), "--out", str(out), "--threads", str(threads)]))


if __name__ == "__main__":
    raise SystemExit(main())
