"""A tour of veil's pointer API: data and models on a worker, training there, ownership.

Run: ``make demo`` (or ``python examples/quickstart.py`` with veil installed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import veil


def main() -> None:
    alice = veil.VirtualWorker("alice")
    bob = veil.VirtualWorker("bob")

    # Pointers: torch calls on them run on the worker.
    x = torch.tensor([1.0, 2.0, 3.0]).send(alice)
    y = (x + x) * 2
    print("y on alice:", y)
    print("y.get():  ", y.get())
    print("moved to bob:", y.move(bob).get())

    # Alice hosts Boston Housing as her own, private data.
    data = veil.datasets.boston()
    alice.host(data.x_train, tags=("#boston", "#features"), private=True)
    alice.host(data.y_train, tags=("#boston", "#target"), private=True)
    features = alice.search("#boston", "#features")[0]
    target = alice.search("#boston", "#target")[0]
    try:
        features.get()
    except veil.PermissionDenied as exc:
        print("features.get() ->", type(exc).__name__, exc)

    # The paper's model trains where the data is; only the model comes home.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                          nn.Linear(24, 1)).send(alice)
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    for _epoch in range(10):
        for i in range(0, 404, 8):
            opt.zero_grad()
            loss = F.mse_loss(model(features[i:i + 8]), target[i:i + 8])
            loss.backward()
            opt.step()
    try:  # even the loss is computed from alice's private data, so it stays with her
        loss.item()
    except veil.PermissionDenied:
        print("loss.item() -> PermissionDenied: derived from alice's private data")
    model.get()
    with torch.no_grad():
        test_mse = F.mse_loss(model(data.x_test), data.y_test).item()
    print(f"test MSE of the model brought home: {test_mse:.3f}")


if __name__ == "__main__":
    main()
