"""Data ownership, the allow-list, garbage collection."""

from __future__ import annotations

import pytest
import torch

import veil
from veil.serde import Ref
from veil.workers import ExecuteCommand, new_id


def test_host_search_and_private_get(make_workers):
    alice = make_workers("alice")
    feats = torch.randn(404, 13)
    alice.host(feats, tags=("#boston", "#features"), description="Boston features", private=True)
    alice.host(torch.randn(404, 1), tags=("#boston", "#target"), private=True)
    found = alice.search("#boston", "#features")
    assert len(found) == 1
    ptr = found[0]
    assert ptr.shape == (404, 13) and ptr.tags == ("#boston", "#features")
    assert ptr.description == "Boston features"
    assert len(alice.search("#boston")) == 2 and alice.search("#nothing") == []
    with pytest.raises(veil.PermissionDenied, match="private to alice"):
        ptr.get()
    derived = (ptr * 2).mean(dim=0)
    with pytest.raises(veil.PermissionDenied):
        derived.get()
    with pytest.raises(veil.PermissionDenied):
        derived.sum().item()
    # computing on it is fine, and public data stays gettable
    assert torch.equal((torch.ones(1).send(alice) + 1).get(), torch.tensor([2.0]))


def test_inplace_writes_of_private_values_taint_the_target(make_workers):
    alice = make_workers("alice")
    alice.host(torch.tensor([5.0, 6.0]), tags=("#x",), private=True)
    (secret,) = alice.search("#x")
    public = torch.zeros(2).send(alice)
    other = torch.zeros(2).send(alice)
    public.add_(secret)
    other[0] = secret[1]
    for leaked in (public, other):
        with pytest.raises(veil.PermissionDenied):
            leaked.get()


def test_allowed_requester_may_get(make_workers):
    alice = make_workers("alice")
    alice.host(torch.tensor([1.0, 2.0]), tags=("#x",), private=True, allowed=("me",))
    (ptr,) = alice.search("#x")
    assert torch.equal((ptr + 1).get(), torch.tensor([2.0, 3.0]))


def test_permission_travels_with_moves(make_workers):
    alice, bob = make_workers("alice", "bob")
    alice.host(torch.tensor([1.0]), tags=("#x",), private=True)
    (ptr,) = alice.search("#x")
    moved = (ptr * 3).move(bob)
    with pytest.raises(veil.PermissionDenied, match="alice"):
        moved.get()


def test_trained_model_comes_home_but_data_and_activations_do_not(make_workers):
    """Permissions follow command results; autograd's writes to .grad are not tracked.

    That is what lets a model trained on private data come home (DP bounds what it reveals).
    """
    alice = make_workers("alice")
    alice.host(torch.randn(8, 3), tags=("#x",), private=True)
    (x,) = alice.search("#x")
    model = torch.nn.Linear(3, 1).send(alice)
    out = model(x)
    out.sum().backward()
    with pytest.raises(veil.PermissionDenied):
        out.get()
    assert model.weight.grad.get().shape == (1, 3)
    assert model.get().weight.shape == (1, 3)


def test_ids_are_128_bit_random():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 for i in ids)


def test_command_not_allowed_leaves_state_unchanged(make_workers):
    alice = make_workers("alice")
    x = torch.ones(2).send(alice)
    count = alice.object_count()
    for op in ("torch.save", "builtins.eval", "Tensor.__class__", "os.system", "get.__dict__",
               "Tensor.set_", "Tensor.storage"):
        alice._submit(ExecuteCommand(op, (Ref(x.id),), {}, new_id()))
        with pytest.raises(veil.CommandNotAllowed, match=op.replace(".", r"\.")):
            alice.flush()
    assert alice.object_count() == count
    assert torch.equal(x.get(), torch.ones(2))


def test_local_call_of_unlisted_op_raises_naming_it(make_workers):
    alice = make_workers("alice")
    x = torch.ones(2).send(alice)
    with pytest.raises(veil.CommandNotAllowed, match="storage"):
        x.untyped_storage()


def test_store_does_not_grow_over_10000_ops(make_workers, kind):
    alice = make_workers("alice")
    x = torch.ones(4).send(alice)
    base = alice.object_count()
    n = 10_000 if kind != "websocket" else 3_000
    for _ in range(n):
        y = x + 1
        x = y * 1
    alice.flush()
    assert torch.equal(x.get(), torch.full((4,), float(n + 1)))
    assert alice.object_count() <= base + 70


def test_model_get_releases_remote_tensors(make_workers):
    alice = make_workers("alice")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()).send(alice)
    assert alice.object_count() == 3
    model.get()
    import gc

    gc.collect()
    alice.flush()
    assert alice.object_count() == 0
