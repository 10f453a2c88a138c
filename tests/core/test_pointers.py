"""Pointers: remote ops, get/move/copy, errors. Runs against every worker kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import veil


def test_send_compute_get(make_workers):
    alice = make_workers("alice")
    x = torch.tensor([1.0, 2.0, 3.0]).send(alice)
    assert isinstance(x, veil.PointerTensor)
    assert x.location is alice and len(x.id) == 16
    assert x.shape == (3,) and x.dtype == torch.float32
    y = (x + x) * 2
    assert y.shape == (3,)
    assert torch.equal(y.get(), torch.tensor([4.0, 8.0, 12.0]))


def test_shapes_known_without_round_trip(make_workers):
    alice = make_workers("alice")
    a = torch.randn(4, 3).send(alice)
    b = torch.randn(3, 5).send(alice)
    requests = []
    real = alice._send_request
    alice._send_request = lambda msg: requests.append(msg) or real(msg)
    c = (a @ b).relu().sum(dim=0)
    assert c.shape == (5,) and c.dtype == torch.float32
    assert requests == []  # pipelined: nothing waited for the worker
    assert torch.allclose(c.get(), (a.get() @ b.get()).relu().sum(0))
    assert len(requests) >= 1


def test_many_ops_match_local(make_workers):
    alice = make_workers("alice")
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    pa, pb = a.send(alice), b.send(alice)
    cases = [
        (lambda x, y: x - y * 3, None),
        (lambda x, y: torch.cat([x, y], dim=0), None),
        (lambda x, y: torch.stack((x, y)).mean(0), None),
        (lambda x, y: x.t() @ y, None),
        (lambda x, y: x[1:3, ::2], None),
        (lambda x, y: torch.where(x > 0, x, y), None),
        (lambda x, y: F.softmax(x, dim=1), None),
        (lambda x, y: x.view(20).reshape(4, 5).T, None),
        (lambda x, y: 2 - x / (y.abs() + 1), None),
        (lambda x, y: x.max(dim=1).values, None),
        (lambda x, y: torch.max(x, dim=0)[1], None),
    ]
    for fn, _ in cases:
        assert torch.allclose(fn(pa, pb).get(), fn(a, b)), fn


def test_python_values_come_back(make_workers):
    alice = make_workers("alice")
    x = torch.tensor([1.0, 2.0, 3.0]).send(alice)
    assert x.sum().item() == 6.0
    assert len(x) == 3 and x.dim() == 1 and x.numel() == 3
    assert bool((x > 0).all())
    assert x.tolist() == [1.0, 2.0, 3.0]


def test_data_dependent_shapes(make_workers):
    alice = make_workers("alice")
    x = torch.tensor([0.0, 1.0, 0.0, 2.0]).send(alice)
    nz = x.nonzero()
    assert nz.shape == (2, 1)
    assert torch.equal(nz.get(), torch.tensor([[1], [3]]))
    sel = x[x > 0]
    assert torch.equal(sel.get(), torch.tensor([1.0, 2.0]))


def test_inplace_and_setitem(make_workers):
    alice = make_workers("alice")
    x = torch.zeros(3).send(alice)
    x.add_(1.0)
    x[0] = 5.0
    x += 1
    assert torch.equal(x.get(), torch.tensor([6.0, 2.0, 2.0]))


def test_move_is_worker_to_worker(make_workers):
    alice, bob = make_workers("alice", "bob")
    x = torch.tensor([1.0, 2.0]).send(alice)
    y = x.move(bob)
    assert y.location is bob
    assert torch.equal(y.get(), torch.tensor([1.0, 2.0]))
    with pytest.raises(veil.ProtocolError, match="moved to bob"):
        x.get()
    alice.flush()
    assert alice.object_count() == 0


def test_copy(make_workers):
    alice = make_workers("alice")
    x = torch.tensor([1.0, 2.0]).send(alice)
    c = x.copy()
    c.add_(1)
    assert torch.equal(x.get(), torch.tensor([1.0, 2.0]))
    assert torch.equal(c.get(), torch.tensor([2.0, 3.0]))


def test_different_workers_raise_naming_both(make_workers):
    alice, bob = make_workers("alice", "bob")
    x = torch.ones(2).send(alice)
    y = torch.ones(2).send(bob)
    with pytest.raises(veil.WorkerMismatch, match=r"alice and bob"):
        x + y


def test_local_tensor_argument_travels_with_the_command(make_workers):
    alice = make_workers("alice")
    x = torch.ones(2).send(alice)
    assert torch.equal((x * torch.tensor([2.0, 3.0])).get(), torch.tensor([2.0, 3.0]))


def test_shape_errors_name_the_op(make_workers):
    alice = make_workers("alice")
    x = torch.ones(2, 3).send(alice)
    y = torch.ones(4, 5).send(alice)
    with pytest.raises(veil.RemoteError, match="matmul"):
        x.matmul(y)


def test_pipelined_error_surfaces_at_next_flush_naming_op(make_workers):
    alice = make_workers("alice")
    x = torch.ones(2, 3).send(alice)
    idx = torch.tensor([7]).send(alice)
    bad = x.index_select(0, idx)  # shapes are fine, the index is not: only the worker can tell
    later = bad * 2  # pipelined after the failure: skipped
    with pytest.raises(veil.RemoteError, match="index_select"):
        later.get()
    # the session recovers after reporting the error
    assert torch.equal((x + 1).get(), torch.full((2, 3), 2.0))


def test_pointer_repr_does_not_fetch(make_workers):
    alice = make_workers("alice")
    x = alice.host(torch.tensor([1234.5]), private=True)
    text = repr(x) + str(x) + f"{x}"
    assert "1234.5" not in text and "alice" in text  # ids are hex: never contain a dot


def test_send_rejects_non_tensors(make_workers):
    alice = make_workers("alice")
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        veil.send([1, 2, 3], alice)
    x = torch.ones(1).send(alice)
    with pytest.raises(TypeError, match="already on alice"):
        x.send(alice)


def test_iteration(make_workers):
    alice = make_workers("alice")
    rows = list(torch.arange(6.0).reshape(3, 2).send(alice))
    assert len(rows) == 3
    assert torch.equal(rows[2].get(), torch.tensor([4.0, 5.0]))
