"""Federated learning: data, the paper's loop, FedAvg, secure aggregation, faults, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import veil
import veil.fl as fl


def mlp(inputs: int = 13, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 1))


def test_federate_and_loader(make_workers):
    alice, bob = make_workers("alice", "bob")
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10.0).reshape(10, 1)
    ds = fl.federate(x, y, [alice, bob])
    assert len(ds) == 10 and [len(p) for p in ds.parts] == [5, 5]
    loader = fl.FederatedDataLoader(ds, batch_size=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert batches[0][0].location is alice and batches[-1][0].location is bob
    assert torch.equal(torch.cat([b[1].get() for b in batches]), y)
    shuffled = fl.FederatedDataLoader(ds, batch_size=5, shuffle=True, seed=1)
    rows = sorted(torch.cat([b[1].get() for b in shuffled]).flatten().tolist())
    assert rows == y.flatten().tolist()


def test_dataset_from_hosted_data(make_workers):
    alice, bob = make_workers("alice", "bob")
    for w in (alice, bob):
        w.host(torch.randn(6, 3), tags=("#x",), private=True)
        w.host(torch.randn(6, 1), tags=("#y",), private=True)
    ds = fl.FederatedDataset.search([alice, bob], "#x", "#y")
    assert len(ds) == 12
    model = nn.Linear(3, 1)
    fl.train_sequential(model, fl.FederatedDataLoader(ds, 4), epochs=1)
    assert type(model.weight) is nn.Parameter


def test_bad_inputs():
    alice = veil.VirtualWorker("alice")
    with pytest.raises(ValueError, match="targets"):
        fl.federate(torch.ones(4, 2), torch.ones(3, 1), [alice])
    with pytest.raises(ValueError, match="batch_size"):
        fl.FederatedDataLoader(fl.federate(torch.ones(4, 2), torch.ones(4, 1), [alice]), 0)
    ds = fl.federate(torch.ones(4, 2), torch.ones(4, 1), [alice])
    with pytest.raises(ValueError, match="min_workers"):
        fl.fedavg(nn.Linear(2, 1), ds, min_workers=2)


def test_paper_loop_equals_centralized_sgd(make_workers, kind):
    """Boston, 2 workers: the paper's FL loop gives centralized SGD's model (same order)."""
    alice, bob = make_workers("alice", "bob")
    data = veil.datasets.boston()
    epochs = 10 if kind == "virtual" else 2
    ds = fl.federate(data.x_train, data.y_train, [alice, bob])
    model = fl.train_sequential(mlp(), fl.FederatedDataLoader(ds, 8), epochs=epochs)
    central = mlp()
    opt = torch.optim.SGD(central.parameters(), lr=0.001)
    for _ in range(epochs):
        for lo, hi in ((0, 202), (202, 404)):
            for i in range(lo, hi, 8):
                j = min(i + 8, hi)
                opt.zero_grad()
                F.mse_loss(central(data.x_train[i:j]), data.y_train[i:j]).backward()
                opt.step()
    with torch.no_grad():
        mse_fl = F.mse_loss(model(data.x_test), data.y_test).item()
        mse_central = F.mse_loss(central(data.x_test), data.y_test).item()
    assert abs(mse_fl - mse_central) <= 0.02 * mse_central


def _fedavg_by_hand(model, parts, lr, epochs):
    """The obviously correct reference: train copies locally, average weighted by counts."""
    states, counts = [], []
    for x, y in parts:
        local = nn.Sequential(*[m for m in __import__("copy").deepcopy(model)])
        opt = torch.optim.SGD(local.parameters(), lr=lr)
        for _ in range(epochs):
            for i in range(0, len(x), 8):
                opt.zero_grad()
                F.mse_loss(local(x[i:i + 8]), y[i:i + 8]).backward()
                opt.step()
        states.append([p.detach() for p in local.parameters()])
        counts.append(len(x))
    total = sum(counts)
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            p.copy_(sum(s[k] * (c / total) for s, c in zip(states, counts)))


@pytest.mark.parametrize("strategy", [fl.FedAvg(), fl.SecureFedAvg()], ids=lambda s: s.name)
def test_fedavg_matches_reference(make_workers, strategy):
    alice, bob, carol = make_workers("alice", "bob", "carol")
    data = veil.datasets.boston()
    x, y = data.x_train[:150], data.y_train[:150]
    ds = fl.federate(x, y, [alice, bob, carol])
    model, ref = mlp(), mlp()
    hist = fl.fedavg(model, ds, rounds=2, local_epochs=1, lr=0.001, strategy=strategy)
    assert [r.round for r in hist.rounds] == [1, 2] and hist.rounds[0].workers == [
        "alice", "bob", "carol"]
    chunks = torch.tensor_split(torch.arange(150), 3)
    for _ in range(2):
        _fedavg_by_hand(ref, [(x[c], y[c]) for c in chunks], 0.001, 1)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5), (p - q).abs().max()


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.lists(st.floats(-50, 50), min_size=1, max_size=20),
       st.integers(1, 300))
def test_secure_sum_equals_plain_sum(parties, values, weight):
    workers = [veil.VirtualWorker(f"w{i}") for i in range(parties)]
    updates = [torch.tensor(values, dtype=torch.float32) * (i + 1) for i in range(parties)]
    ptrs = [u.send(w) for u, w in zip(updates, workers)]
    weights = [float(weight + i) for i in range(parties)]
    got = fl.secure_sum(ptrs, weights, precision_bits=24)
    want = sum(u.double() * w for u, w in zip(updates, weights))
    assert torch.allclose(got, want, atol=parties * 2**-24 * 1.01)


def test_secure_aggregation_never_reveals_an_update():
    """Each value the aggregator receives is a sum of shares, not any client's update."""
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    u = torch.full((50,), 0.25)
    received = []
    real_get = veil.PointerTensor.get

    def spy(self):
        value = real_get(self)
        received.append(value)
        return value

    veil.PointerTensor.get = spy
    try:
        total = fl.secure_sum([u.send(alice), (2 * u).send(bob)], [1.0, 1.0])
    finally:
        veil.PointerTensor.get = real_get
    assert torch.allclose(total, torch.full((50,), 0.75, dtype=torch.float64))
    assert len(received) == 2
    for value in received:
        assert value.dtype == torch.int64
        decoded = value.double() / 2**24
        assert not torch.allclose(decoded, u.double())
        assert not torch.allclose(decoded, 2 * u.double())
        assert value.unique().numel() > 40  # uniform masks, not a constant


def test_secure_aggregation_needs_two_workers():
    alice = veil.VirtualWorker("alice")
    with pytest.raises(veil.ProtocolError, match="at least 2"):
        fl.secure_sum([torch.ones(2).send(alice)], [1.0])


class _Broken(veil.VirtualWorker):
    """A worker whose connection drops after ``ok`` messages."""

    def __init__(self, name, ok):
        super().__init__(name)
        self.ok = ok

    def _tick(self):
        self.ok -= 1
        if self.ok < 0:
            raise veil.WorkerUnavailable(f"{self.name} went away")

    def _submit(self, msg):
        self._tick()
        super()._submit(msg)

    def _run(self, *args):
        self._tick()
        super()._run(*args)

    def _send_request(self, msg):
        self._tick()
        return super()._send_request(msg)


@pytest.mark.parametrize("fused", [True, False])
def test_dropped_worker_is_reported_and_round_completes(fused):
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    carol = _Broken("carol", ok=10**9)
    data = veil.datasets.boston()
    ds = fl.federate(data.x_train[:90], data.y_train[:90], [alice, bob, carol])
    carol.ok = 2  # the model arrives, carol starts training, and is gone before the update
    hist = fl.fedavg(mlp(), ds, rounds=1, min_workers=2, fused=fused)
    assert hist.rounds[0].workers == ["alice", "bob"]
    assert "carol" in hist.rounds[0].dropped
    assert "went away" in hist.rounds[0].dropped["carol"]
    bob2, carol2 = _Broken("bob", ok=10**9), _Broken("carol", ok=10**9)
    ds2 = fl.federate(data.x_train[:90], data.y_train[:90], [alice, bob2, carol2])
    bob2.ok = carol2.ok = 2
    with pytest.raises(fl.NotEnoughWorkers, match="1 of 3"):
        fl.fedavg(mlp(), ds2, rounds=1, min_workers=2, fused=fused)


def test_checkpoint_resume_loses_nothing(tmp_path):
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    data = veil.datasets.boston()
    ds = fl.federate(data.x_train[:100], data.y_train[:100], [alice, bob])
    straight = mlp()
    fl.fedavg(straight, ds, rounds=4, shuffle=True, seed=3)
    path = tmp_path / "run.ckpt"
    resumed = mlp()

    class Stop(Exception):
        pass

    def stop_after_two(report, model):
        if report.round == 2:
            raise Stop

    with pytest.raises(Stop):
        fl.fedavg(resumed, ds, rounds=4, shuffle=True, seed=3, checkpoint=path,
                  on_round=stop_after_two)
    fresh = mlp(seed=99)  # a new process would start from anything
    hist = fl.fedavg(fresh, ds, rounds=4, shuffle=True, seed=3, checkpoint=path)
    assert [r.round for r in hist.rounds] == [1, 2, 3, 4]
    for p, q in zip(fresh.parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_checkpoint_keeps_privacy_spent(tmp_path):
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    data = veil.datasets.boston()
    ds = fl.federate(data.x_train[:60], data.y_train[:60], [alice, bob])
    path = tmp_path / "dp.ckpt"
    first = fl.DPFedAvg(0.05, 1.0, 2, generator=torch.Generator().manual_seed(1))
    fl.fedavg(mlp(), ds, rounds=2, strategy=first, checkpoint=path)
    again = fl.DPFedAvg(0.05, 1.0, 2)
    fl.fedavg(mlp(), ds, rounds=3, strategy=again, checkpoint=path)
    assert len(again.rounds) == 3  # the two rounds before the restart still count


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"\x93garbage")
    with pytest.raises(veil.SerializationError):
        fl.load_checkpoint(path)


def test_fedprox_runs_and_differs():
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    data = veil.datasets.boston()
    ds = fl.federate(data.x_train[:80], data.y_train[:80], [alice, bob])
    a, b = mlp(), mlp()
    fl.fedavg(a, ds, rounds=1, local_epochs=2, lr=0.01)
    fl.fedavg(b, ds, rounds=1, local_epochs=2, lr=0.01, prox_mu=1.0)
    assert not torch.allclose(a[0].weight, b[0].weight)


def test_dp_fedavg_clips_noises_and_accounts():
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    workers = [veil.VirtualWorker(n) for n in ("alice", "bob")]
    updates = [torch.full((4,), 10.0).send(workers[0]), torch.full((4,), 0.1).send(workers[1])]
    cu = [fl.ClientUpdate(w, 5, u) for w, u in zip(workers, updates)]
    # without noise the result is the mean of the clipped updates
    exact = fl.DPFedAvg(0.0, max_norm=1.0, total_clients=2).aggregate(cu)
    # (10,10,10,10) has norm 20: clipped to norm 1; (0.1, ...) has norm 0.2: kept
    assert torch.allclose(exact, torch.full((4,), (0.5 + 0.1) / 2, dtype=torch.float64))
    secure = fl.DPFedAvg(0.0, max_norm=1.0, total_clients=2, secure=True).aggregate(cu)
    assert torch.allclose(secure, exact, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    strat = fl.DPFedAvg(1.0, max_norm=1.0, total_clients=2, generator=gen)
    noisy = strat.aggregate(cu)
    assert not torch.allclose(noisy, exact)
    acc = RdpAccountant()
    acc.compose(GaussianDpEvent(1.0), 1)
    assert strat.epsilon() == pytest.approx(acc.get_epsilon(1e-5))
    budget = fl.DPFedAvg(1.0, 1.0, 2, max_epsilon=strat.epsilon() * 1.05)
    budget.aggregate(cu)
    with pytest.raises(veil.PrivacyBudgetExceeded, match="over the budget"):
        budget.aggregate(cu)
    assert len(budget.rounds) == 1  # the refused round spent nothing


def test_dp_fedavg_trains():
    alice, bob = veil.VirtualWorker("alice"), veil.VirtualWorker("bob")
    data = veil.datasets.boston()
    ds = fl.federate(data.x_train, data.y_train, [alice, bob])
    model = mlp()
    strat = fl.DPFedAvg(0.05, max_norm=1.0, total_clients=2,
                        generator=torch.Generator().manual_seed(0))
    fl.fedavg(model, ds, rounds=3, lr=0.001, strategy=strat)
    assert len(strat.rounds) == 3 and strat.epsilon() > 0
    with torch.no_grad():
        assert torch.isfinite(F.mse_loss(model(data.x_test), data.y_test))
