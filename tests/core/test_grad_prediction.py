"""Which leaves have a ``.grad`` after a remote backward, predicted without a round trip.

Network workers predict it from the pointers' lineage (and the worker checks the prediction);
in-process workers ask. Both must agree with local autograd in every case below, including
parameters a forward does not use, accumulation without ``zero_grad``, ``backward(inputs=)``
and in-place updates under autograd. A wrong prediction must fail loudly, never silently skip
a parameter's update.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.worker_kinds import KINDS
from torch import nn

import veil
from veil.pointers._tensor import _predict_grads


class PredictingWorker(veil.VirtualWorker):
    """An in-process worker that predicts grads as network workers do."""

    _predict_grads = True


@pytest.fixture(params=["predicting", "websocket"])
def worker(request):
    if request.param == "predicting":
        yield PredictingWorker("alice")
        return
    with KINDS["websocket"](("alice",)) as (alice,):
        yield alice


class TwoHeads(nn.Module):
    """A user's module (sent parameter by parameter) whose second head is sometimes unused."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.head_a = nn.Linear(3, 1)
        self.head_b = nn.Linear(3, 1)

    def forward(self, x, use_b: bool):
        h = torch.relu(self.body(x))
        return self.head_b(h) if use_b else self.head_a(h)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _remote_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.copy().get()
            for n, p in model.named_parameters()}


def _same(local: dict, remote: dict) -> None:
    assert local.keys() == remote.keys()
    for name in local:
        assert (local[name] is None) == (remote[name] is None), name
        if local[name] is not None:
            torch.testing.assert_close(remote[name], local[name], rtol=0, atol=1e-6)


def test_unused_parameters_and_accumulation(worker):
    x = torch.randn(5, 4)
    y = torch.randn(5, 1)
    local = TwoHeads()
    remote = TwoHeads().send(worker)
    xr, yr = x.send(worker), y.send(worker)
    for use_b in (False, True, False):  # no zero_grad: gradients accumulate
        F.mse_loss(local(x, use_b), y).backward()
        F.mse_loss(remote(xr, use_b), yr).backward()
        _same(_grads(local), _remote_grads(remote))
    local.zero_grad()
    remote.zero_grad()
    F.mse_loss(local(x, True), y).backward()
    F.mse_loss(remote(xr, True), yr).backward()
    _same(_grads(local), _remote_grads(remote))
    worker.flush()


def test_training_with_an_unused_head_matches_local(worker):
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    local, remote = TwoHeads(), TwoHeads().send(worker)
    xr, yr = x.send(worker), y.send(worker)
    opt_l = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    opt_r = torch.optim.SGD(remote.parameters(), lr=0.1, momentum=0.9)
    for step in range(6):
        for model, opt, a, b in ((local, opt_l, x, y), (remote, opt_r, xr, yr)):
            opt.zero_grad()
            F.mse_loss(model(a, step % 3 == 0), b).backward()
            opt.step()
    home = remote.get()
    for (name, p), q in zip(local.named_parameters(), home.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_backward_with_inputs_and_inplace_under_autograd(worker):
    torch.manual_seed(1)
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    ra, rb = a.detach().send(worker).requires_grad_(), b.detach().send(worker).requires_grad_()
    (a * b).sum().backward(inputs=[a])
    (ra * rb).sum().backward(inputs=[ra])
    assert rb.grad is None and b.grad is None
    torch.testing.assert_close(ra.grad.copy().get(), a.grad)
    c = torch.ones(3, requires_grad=True)
    rc = torch.ones(3).send(worker).requires_grad_()
    d, rd = c * 2, rc * 2
    d.add_(b)  # in place under autograd: d now also depends on b
    rd.add_(rb)
    d.sum().backward()
    rd.sum().backward()
    torch.testing.assert_close(rb.grad.copy().get(), b.grad)
    torch.testing.assert_close(rc.grad.copy().get(), c.grad)
    worker.flush()


def test_a_wrong_prediction_fails_at_the_next_flush():
    worker = PredictingWorker("alice")
    w = torch.ones(2).send(worker).requires_grad_()
    v = torch.ones(2).send(worker).requires_grad_()
    (w * 3).sum().backward()
    _predict_grads(worker, frozenset({v.id}))  # claims v has a gradient: it has none
    with pytest.raises(veil.ProtocolError, match=r"veil\.expect_grads"):
        worker.flush()
