"""Encrypted XOR: a linear read-out over a random ReLU reservoir, trained on shared data.

XOR is not linearly separable, but it becomes so after a fixed random projection followed by
ReLU (a tiny "reservoir"). Everything is secret-shared between two workers, alice and bob:
the four inputs, their targets, the reservoir's weights and the trainable read-out. carol is
the crypto provider. The reservoir's ReLU runs veil's exact comparison protocol, the read-out
is an unchanged ``nn.Linear`` trained with ``torch.optim.SGD`` on the MSE loss, and at the end
the reconstructed predictions, rounded, equal the targets.

Run: ``python examples/encrypted_xor_reservoir.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import veil
import veil.mpc

INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def reservoir(width: int, seed: int) -> nn.Module:
    """A fixed random ReLU feature map (not trained)."""
    torch.manual_seed(seed)
    layer = nn.Linear(2, width)
    for p in layer.parameters():
        p.requires_grad_(False)
    return nn.Sequential(layer, nn.ReLU())


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    alice, bob, carol = (veil.VirtualWorker(n) for n in ("alice", "bob", "carol"))
    share = dict(crypto_provider=carol)
    x = INPUTS.fix_precision().share(alice, bob, **share)
    y = TARGETS.fix_precision().share(alice, bob, **share)
    features = reservoir(args.width, args.seed).fix_precision().share(alice, bob, **share)
    torch.manual_seed(args.seed)
    readout = nn.Linear(args.width, 1).fix_precision().share(alice, bob, **share)

    with torch.no_grad():
        h = features(x)  # shared ReLU features, computed once
    opt = torch.optim.SGD(readout.parameters(), lr=args.lr)
    for step in range(args.steps):
        opt.zero_grad()
        loss = F.mse_loss(readout(h), y)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.get().float_precision().item():.4f}")

    with torch.no_grad():
        pred = readout(h).get().float_precision()
    labels = (pred > 0.5).float()
    print("inputs     ", INPUTS.tolist())
    print("predictions", [round(v, 3) for v in pred.flatten().tolist()])
    print("targets    ", TARGETS.flatten().tolist())
    print("correct:", bool(torch.equal(labels, TARGETS)))
    return {"predictions": pred, "labels": labels}


if __name__ == "__main__":
    out = main()
    if not torch.equal(out["labels"], TARGETS):
        raise SystemExit("the encrypted model did not learn XOR")
