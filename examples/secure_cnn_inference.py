"""Encrypted CNN inference: a model owner's trained network classifies a client's images
while both stay secret-shared.

The model owner trains a small convolutional network in plaintext (``Conv2d``,
``BatchNorm2d``, ``ReLU``, ``MaxPool2d`` with padding, ``AdaptiveAvgPool2d``, ``Linear``) to
tell three kinds of noisy 8x8 images apart: a horizontal bar, a vertical bar (each at a
random place) and the diagonal. The model is then secret-shared between two workers, alice and
bob (carol is the crypto provider), and so are the client's test images. Every layer runs
unchanged on the shares: convolutions as exact ring products, ReLU and max pooling with
veil's exact comparisons, batch normalisation (torch's own decomposition of it) with the
``rsqrt`` approximation. Only the logits are reconstructed, and the predicted classes equal
the plaintext model's.

Run: ``python examples/secure_cnn_inference.py``
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.mpc

CLASSES = ("horizontal", "vertical", "diagonal")


def images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` noisy 8x8 images, a third of each class, and their labels."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(count, 1, 8, 8, generator=gen)
    labels = torch.arange(count) % 3
    for i, label in enumerate(labels.tolist()):
        at = int(torch.randint(1, 7, (1,), generator=gen))
        if label == 0:
            x[i, 0, at, 1:7] += 1.0
        elif label == 1:
            x[i, 0, 1:7, at] += 1.0
        else:
            x[i, 0, torch.arange(8), torch.arange(8)] += 1.0
    return x, labels


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, len(CLASSES)),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300, help="training images")
    parser.add_argument("--test", type=int, default=30, help="images classified encrypted")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = network()
    x_train, y_train = images(args.train, args.seed)
    train(model, x_train, y_train, args.steps)
    x_test, y_test = images(args.test, args.seed + 1)
    with torch.no_grad():
        plain_logits = model(x_test)
    variances = model[1].running_var
    print(
        f"batch-norm running variances {variances.min():.3f} .. {variances.max():.3f} "
        "(rsqrt's domain at 16 fractional bits: [2^-14, 2^44))"
    )

    alice, bob, carol = (veil.VirtualWorker(n) for n in ("alice", "bob", "carol"))
    secure = copy.deepcopy(model).fix_precision().share(alice, bob, crypto_provider=carol)
    shared_images = x_test.fix_precision().share(alice, bob, crypto_provider=carol)
    with torch.no_grad():
        logits = secure(shared_images).get().float_precision()

    plain_pred, pred = plain_logits.argmax(1), logits.argmax(1)
    gap = float((logits - plain_logits).abs().max())
    print(
        f"plaintext accuracy {float((plain_pred == y_test).float().mean()):.3f}, "
        f"encrypted accuracy {float((pred == y_test).float().mean()):.3f}"
    )
    same = bool(torch.equal(pred, plain_pred))
    print(f"largest logit difference {gap:.2e}; same classes: {same}")
    return {"logits": logits, "plain_logits": plain_logits, "labels": y_test, "gap": gap}


if __name__ == "__main__":
    out = main()
    if not torch.equal(out["logits"].argmax(1), out["plain_logits"].argmax(1)):
        raise SystemExit("encrypted inference disagreed with the plaintext model")
