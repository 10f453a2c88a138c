"""Moves between network workers go worker to worker, authenticated, into the client's session."""

from __future__ import annotations

import contextlib
import copy
import time

import pytest
import torch

import veil
from veil.net import connect, new_token
from veil.net._process import started_workers

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def pair():
    token = new_token()
    with started_workers(
        ("alice", {"token": token}),
        ("bob", {"token": token, "args": ["--max-bytes", "1M"]}),
        ("eve", {"token": new_token()}),  # a worker with another token
        ("carol", {"token": token}),
        ("dave", {"token": token}),
    ) as procs:
        yield procs


def test_move_goes_worker_to_worker(pair):
    a, b, _, _, _ = pair
    with (
        connect(a.url, token=a.token, timeout=10) as alice,
        connect(b.url, token=b.token, timeout=10) as bob,
    ):
        x = torch.randn(100_000)  # 400 kB
        ptr = x.send(alice)
        alice.flush()
        received = alice.bytes_received + bob.bytes_received
        sent = alice.bytes_sent + bob.bytes_sent
        moved = (ptr * 2).move(bob)
        assert moved.location is bob
        assert (moved.sum() - (x * 2).sum()).abs().item() < 1e-2
        # the value never passed through this process
        assert alice.bytes_received + bob.bytes_received - received < 10_000
        assert alice.bytes_sent + bob.bytes_sent - sent < 10_000
        assert alice.object_count() == 1  # only ptr: the product left alice
        assert bob.object_count() == 1  # the moved value (the sum was freed)
        assert torch.allclose(moved.get(), x * 2)


def test_moved_objects_belong_to_the_client_on_the_destination(pair):
    a, b, _, _, _ = pair
    alice = connect(a.url, token=a.token, timeout=10)
    with connect(b.url, token=b.token, timeout=10) as observer:
        bob = connect(b.url, token=b.token, timeout=10)
        kept = [torch.ones(10).send(alice).move(bob) for _ in range(3)]
        bob.flush()
        assert observer.object_count() == 3
        bob.close()  # bob's session ends: what was moved into it is released
        deadline = time.monotonic() + 5
        while observer.object_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert observer.object_count() == 0
        del kept
    alice.close()


def test_a_move_over_the_destination_limit_reports_it(pair):
    a, b, _, _, _ = pair
    with (
        connect(a.url, token=a.token, timeout=10) as alice,
        connect(b.url, token=b.token, timeout=10) as bob,
    ):
        big = torch.ones(300_000).send(alice)  # 1.2 MB: over bob's 1 MiB per client
        moved = big.move(bob)
        with pytest.raises(veil.LimitExceeded, match="move failed on alice"):
            alice.flush()
        with pytest.raises(veil.ObjectNotFound):
            moved.get()
        assert (torch.ones(1).send(alice) + 1).get().item() == 2.0  # alice goes on


def test_a_worker_with_another_token_refuses_the_delivery(pair):
    a, _, e, _, _ = pair
    with (
        connect(a.url, token=a.token, timeout=10) as alice,
        connect(e.url, token=e.token, timeout=10) as eve,
    ):
        ptr = torch.ones(3).send(alice)
        ptr.move(eve)
        with pytest.raises(veil.AuthenticationError, match="refused worker 'alice'"):
            alice.flush()
        assert eve.object_count() == 0


def test_moves_to_and_from_in_process_workers_fail_clearly(pair):
    a, _, _, _, _ = pair
    with connect(a.url, token=a.token, timeout=10) as alice:
        local = veil.VirtualWorker("local")
        torch.ones(2).send(alice).move(local)
        with pytest.raises(veil.WorkerUnavailable, match="cannot reach"):
            alice.flush()
        torch.ones(2).send(local).move(alice)
        with pytest.raises(veil.WorkerUnavailable, match="no virtual worker at ws://"):
            local.flush()


def test_a_move_to_a_departed_client_reports_that_its_session_ended(pair):
    a, b, _, _, _ = pair
    with connect(a.url, token=a.token, timeout=10) as alice:
        bob = connect(b.url, token=b.token, timeout=10)
        bob.close()
        torch.ones(2).send(alice).move(bob)
        with pytest.raises(veil.WorkerUnavailable, match=r"session on .* has ended"):
            alice.flush()


def test_crossing_moves_each_followed_by_a_use(pair):
    """alice -> bob and bob -> alice, pipelined, each followed by a use of what came in."""
    a, b, _, _, _ = pair
    with (
        connect(a.url, token=a.token, timeout=10) as alice,
        connect(b.url, token=b.token, timeout=10) as bob,
    ):
        x_a = torch.tensor([1.0, 2.0]).send(alice)
        x_b = torch.tensor([10.0, 20.0]).send(bob)
        to_b = x_a.copy().move(bob)
        to_a = x_b.copy().move(alice)
        s_b = to_b + x_b
        s_a = to_a + x_a
        assert s_a.get().tolist() == [11.0, 22.0] and s_b.get().tolist() == [11.0, 22.0]


def test_secret_sharing_over_network_workers(pair):
    mpc = pytest.importorskip("veil.mpc")
    a, b, _, c, _ = pair
    with (
        connect(a.url, token=a.token, timeout=30) as alice,
        connect(b.url, token=b.token, timeout=30) as bob,
        connect(c.url, token=c.token, timeout=30) as carol,
    ):
        x = torch.tensor([0.5, -1.25, 3.0])
        s = mpc.fix_precision(x).share(alice, bob, crypto_provider=carol)
        got = (s * s + s).sum().get().float_precision()
        assert abs(got.item() - (x * x + x).sum().item()) < 1e-3


@pytest.mark.parametrize("truncation", ["dealer", "local"])
def test_secure_training_step_over_network_workers(pair, truncation):
    """Secret-shared data and model on three worker processes: forward with a secure ReLU,
    backward, an SGD step; the revealed weights match the same step in plaintext, with
    either truncation protocol."""
    pytest.importorskip("veil.mpc")
    from veil.mpc import _runtime

    a, b, _, c, _ = pair

    def check(parties, carol):
        # alice gets seeds, not bundles
        assert _runtime.context(parties, carol, truncation).seeded

    _compare_training(3, (a, b), c, truncation, check)


def test_secure_training_step_among_three_network_parties(pair):
    """Three parties: every opening goes through party 0's relay, over the network."""
    pytest.importorskip("veil.mpc")
    a, b, _, c, d = pair
    _compare_training(4, (a, b, d), c, "dealer")


def _compare_training(seed, party_procs, provider_proc, truncation, check=None):
    """Two SGD steps of a small ReLU MLP on data and model shared among ``party_procs``
    (``provider_proc`` deals): the revealed loss and weights match plaintext."""
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    with contextlib.ExitStack() as stack:
        parties = tuple(
            stack.enter_context(connect(p.url, token=p.token, timeout=30)) for p in party_procs
        )
        carol = stack.enter_context(
            connect(provider_proc.url, token=provider_proc.token, timeout=30)
        )
        kw = {"crypto_provider": carol, "truncation": truncation}
        secure = model.fix_precision().share(*parties, **kw)
        if check is not None:
            check(parties, carol)
        xs = x.fix_precision().share(*parties, **kw)
        ys = y.fix_precision().share(*parties, **kw)
        loss = _two_sgd_steps(secure, xs, ys)
        got = [p.get().float_precision() for p in secure.parameters()]
        secure_loss = loss.get().float_precision().item()
    plain_loss = _two_sgd_steps(plain, x, y)
    assert abs(secure_loss - plain_loss.item()) < 1e-2
    for g, p in zip(got, plain.parameters()):
        torch.testing.assert_close(g, p.detach(), atol=1e-2, rtol=0)


def _two_sgd_steps(model, x, y):
    """Two SGD steps (lr 0.1) on MSE; the last step's loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return loss


@contextlib.contextmanager
def _parties_and_dealer(pair):
    """Connections to alice and bob (the parties) and carol (the dealer)."""
    a, b, _, c, _ = pair
    with (
        connect(a.url, token=a.token, timeout=30) as alice,
        connect(b.url, token=b.token, timeout=30) as bob,
        connect(c.url, token=c.token, timeout=30) as carol,
    ):
        yield alice, bob, carol


def test_views_recurrent_layers_and_wide_roots_over_network_workers(pair):
    """This session's local share ops over real worker processes: writes through views and
    masks (slice/select/diagonal scatters, index_put with None in the indices), an LSTM
    layer and its gradient, an embedding bag, and the range-reduced square root."""
    pytest.importorskip("veil.mpc")
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(9)
    x = torch.randn(3, 4)
    lstm = nn.LSTM(4, 2)
    bag = nn.EmbeddingBag(6, 2, mode="mean")
    with _parties_and_dealer(pair) as (alice, bob, carol):
        kw = {"crypto_provider": carol}
        s = x.fix_precision().share(alice, bob, **kw)
        plain = x.clone()
        for t in (s, plain):
            t[0] = 1.5
            t[:, 1].add_(1.0)
            t.diagonal().mul_(2)
            t[:, torch.tensor([0, 3])] = -0.25
        torch.testing.assert_close(s.get().float_precision(), plain, atol=1e-4, rtol=0)
        secure_lstm = copy.deepcopy(lstm).fix_precision().share(alice, bob, **kw)
        seq = x.unsqueeze(1)
        out = secure_lstm(x.unsqueeze(1).fix_precision().share(alice, bob, **kw))[0]
        out.sum().backward()
        lstm(seq)[0].sum().backward()
        torch.testing.assert_close(
            out.get().float_precision(), lstm(seq)[0].detach(), atol=2e-3, rtol=0
        )
        grad = secure_lstm.weight_hh_l0.grad.get().float_precision()
        torch.testing.assert_close(grad, lstm.weight_hh_l0.grad, atol=2e-3, rtol=0)
        idx, off = torch.tensor([1, 2, 5, 0]), torch.tensor([0, 3])
        secure_bag = copy.deepcopy(bag).fix_precision().share(alice, bob, **kw)
        torch.testing.assert_close(
            secure_bag(idx, off).get().float_precision(), bag(idx, off).detach(), atol=1e-3, rtol=0
        )
        big = torch.tensor([1e-3, 2.0, 5e4])
        root = F.relu(big.fix_precision().share(alice, bob, **kw)).sqrt()
        torch.testing.assert_close(root.get().float_precision(), big.sqrt(), atol=1e-3, rtol=1e-4)


def test_ragged_maxima_and_resampling_over_network_workers(pair):
    """Ragged maxima (adaptive max pooling of unequal windows, scatter_reduce amax, a max
    embedding bag) and resampling with public weights (bilinear upsampling), forward and
    backward, over real worker processes."""
    pytest.importorskip("veil.mpc")
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(10)
    x = torch.randn(1, 2, 5, 3, requires_grad=True)
    bag = nn.EmbeddingBag(6, 2, mode="max")
    with _parties_and_dealer(pair) as (alice, bob, carol):
        kw = {"crypto_provider": carol}
        s = x.detach().fix_precision().share(alice, bob, **kw).requires_grad_()
        for fn in (lambda t: F.adaptive_max_pool2d(t, (3, 2)),
                   lambda t: F.interpolate(t, scale_factor=2, mode="bilinear")):
            ref, got = fn(x), fn(s)
            torch.testing.assert_close(got.get().float_precision(), ref.detach(), atol=1e-3,
                                       rtol=0)
            ref.sum().backward()
            got.sum().backward()
        torch.testing.assert_close(s.grad.get().float_precision(), x.grad, atol=2e-3, rtol=0)
        index = torch.tensor([[0, 1], [0, 0], [2, 1]])
        src = torch.randn(3, 2)
        ref = x.detach()[0, 0, :3, :2].scatter_reduce(0, index, src, "amax")
        got = s[0, 0, :3, :2].scatter_reduce(0, index, src.fix_precision().share(alice, bob, **kw),
                                             "amax")
        torch.testing.assert_close(got.get().float_precision(), ref, atol=1e-4, rtol=0)
        idx, off = torch.tensor([1, 2, 5, 0]), torch.tensor([0, 3])
        secure_bag = copy.deepcopy(bag).fix_precision().share(alice, bob, **kw)
        torch.testing.assert_close(
            secure_bag(idx, off).get().float_precision(), bag(idx, off).detach(), atol=1e-4, rtol=0
        )
