"""Secure training of the paper's Boston Housing MLP: data and model secret-shared.

Two workers, alice and bob, each hold one additive share of the training data, the targets
and every weight of the 13 -> 32 -> 24 -> 1 ReLU network; carol, the crypto provider, deals
the correlated randomness (Beaver triples, truncation pairs, comparison masks) and never sees
a value. The model is an unchanged ``torch.nn`` module trained by ``torch.optim.SGD`` (lr 0.001,
batch 8) with the paper's loop; ReLU uses veil's exact comparison protocol.

The same model is trained in plaintext from the same seed on the same batches, and the test
MSE of the secure model (evaluated on the secret-shared test set) must be within 2% of it.

Run: ``VEIL_DATA_DIR=../shared/data python examples/secure_boston.py [--epochs 10]``
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.mpc


def paper_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1)
    )


def batches(n: int, size: int, epoch: int, seed: int) -> list[slice | torch.Tensor]:
    """The same shuffled batches for both trainings (a seeded permutation per epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return [order[i : i + size] for i in range(0, n, size)]


def train(model: nn.Module, x, y, epochs: int, lr: float, batch: int, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for idx in batches(x.shape[0], batch, epoch, seed):
            opt.zero_grad()
            loss = F.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = veil.datasets.boston()

    plain = paper_mlp(args.seed)
    t0 = time.perf_counter()
    train(plain, data.x_train, data.y_train, args.epochs, args.lr, args.batch, args.seed)
    plain_time = time.perf_counter() - t0
    with torch.no_grad():
        plain_mse = F.mse_loss(plain(data.x_test), data.y_test).item()

    alice, bob, carol = (veil.VirtualWorker(n) for n in ("alice", "bob", "carol"))
    parties = dict(crypto_provider=carol)
    x = data.x_train.fix_precision().share(alice, bob, **parties)
    y = data.y_train.fix_precision().share(alice, bob, **parties)
    model = paper_mlp(args.seed).fix_precision().share(alice, bob, **parties)
    t0 = time.perf_counter()
    train(model, x, y, args.epochs, args.lr, args.batch, args.seed)
    secure_time = time.perf_counter() - t0

    x_test = data.x_test.fix_precision().share(alice, bob, **parties)
    with torch.no_grad():
        pred = model(x_test).get().float_precision()
    secure_mse = F.mse_loss(pred, data.y_test).item()
    gap = abs(secure_mse - plain_mse) / plain_mse
    steps = args.epochs * len(batches(data.x_train.shape[0], args.batch, 0, args.seed))
    print(f"plaintext  test MSE {plain_mse:8.4f}   ({plain_time / steps * 1e3:.2f} ms/batch)")
    print(f"secure     test MSE {secure_mse:8.4f}   ({secure_time / steps * 1e3:.2f} ms/batch)")
    print(f"relative difference {gap:.2%} (must be within 2%)")
    model.get().float_precision()
    return {"plain_mse": plain_mse, "secure_mse": secure_mse, "gap": gap}


if __name__ == "__main__":
    result = main()
    if result["gap"] > 0.02:
        raise SystemExit("secure training differs from plaintext by more than 2%")
