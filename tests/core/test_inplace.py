"""In-place commands (the optimizer's hot path) keep the rules of every other command."""

from __future__ import annotations

import pytest
import torch

import veil


def test_inplace_updates_values_and_grads(make_workers):
    w = make_workers("alice")
    p = torch.ones(3).send(w).requires_grad_()
    (p * torch.tensor([1.0, 2.0, 3.0]).send(w)).sum().backward()
    with torch.no_grad():
        p.add_(p.grad, alpha=-0.5)
        p.mul_(2)
    assert torch.equal(p.get(), torch.tensor([1.0, 0.0, -1.0]))


def test_an_inplace_error_surfaces_at_the_next_flush_naming_the_op(make_workers):
    w = make_workers("alice")
    a, b = torch.ones(3).send(w), torch.ones(4).send(w)
    a.add_(b)  # shapes do not match: pipelined, so nothing is raised yet
    with pytest.raises(veil.RemoteError, match="add_"):
        w.flush()
    assert torch.equal(a.get(), torch.ones(3))  # the worker is usable again


def test_inplace_writes_of_private_values_carry_their_restriction(make_workers):
    w = make_workers("alice")
    secret = w.host(torch.full((3,), 7.0), private=True)
    mine = torch.zeros(3).send(w)
    mine.add_(secret)
    with pytest.raises(veil.PermissionDenied):
        mine.get()
    other = torch.zeros(3).send(w)
    other.add_(1.0)  # no private operand: still mine to take
    assert torch.equal(other.get(), torch.ones(3))
