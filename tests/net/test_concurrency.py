"""One worker serves many clients at once; each client's results stay its own."""

from __future__ import annotations

import threading

import pytest
import torch

from veil.net import connect

pytestmark = pytest.mark.network

CLIENTS = 24
OPS = 120


def test_many_clients_at_once_every_result_checked(alice):
    barrier = threading.Barrier(CLIENTS)
    failures: list[str] = []
    checked = [0] * CLIENTS

    def client(k: int) -> None:
        try:
            with connect(alice.url, token=alice.token, timeout=30, name=f"c{k}") as w:
                gen = torch.Generator().manual_seed(k)
                local = torch.randn(5, generator=gen)
                remote = local.send(w)
                barrier.wait(timeout=60)
                for i in range(OPS):
                    if i % 3 == 0:
                        local, remote = local * 0.5 + i, remote * 0.5 + i
                    elif i % 3 == 1:
                        local, remote = torch.relu(local - k), torch.relu(remote - k)
                    else:
                        other = torch.full((5,), float(i))
                        local, remote = local + other, remote + other.send(w)
                    got = remote.get()
                    if not torch.allclose(got, local):
                        failures.append(f"client {k} op {i}: {got} != {local}")
                        return
                    checked[k] += 1
                assert remote.sum().item() == pytest.approx(local.sum().item(), rel=1e-6)
        except Exception as exc:  # reported below, with the client's number
            failures.append(f"client {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:5]
    assert checked == [OPS] * CLIENTS
    with connect(alice.url, token=alice.token, timeout=10) as w:
        for _ in range(200):  # every client's objects were released when it left
            if w.object_count() == 0:
                break
            threading.Event().wait(0.02)
        assert w.object_count() == 0
