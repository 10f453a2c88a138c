"""Per-sample gradients against a per-example loop, layer by layer (hypothesis over shapes)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.dp.helpers import assert_matches, projection_loss
from veil.dp import NoPerSampleGradients, PerSampleGradients, UnsupportedLayerError

FEW = settings(max_examples=12, deadline=None)
batches = st.integers(1, 5)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


@FEW
@given(
    batch=batches,
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear(batch, d_in, d_out, bias, seed):
    _seeded(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias), nn.Tanh(), nn.Linear(d_out, 2))
    assert_matches(model, (torch.randn(batch, d_in),), projection_loss(seed))


@FEW
@given(
    batch=batches,
    steps=st.integers(1, 6),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_linear_on_sequences(batch, steps, d_in, d_out, seed):
    # covers both ghost-norm branches (Gram matrices when steps are few, else materialized)
    _seeded(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, 3))
    assert_matches(model, (torch.randn(batch, steps, d_in),), projection_loss(seed))


def test_linear_frozen_weight_trainable_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    assert_matches(model, (torch.randn(5, 4),), projection_loss())
    assert not model[0].weight.requires_grad  # stays frozen after remove()
    assert model[0].bias.requires_grad


@FEW
@given(
    batch=batches,
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d(batch, groups, kernel, stride, dilation, padding, mode, bias, seed):
    _seeded(seed)
    conv = nn.Conv2d(
        2,
        4,
        kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(batch, 2, 6, 7)
    model(x)  # materialize the lazy layer
    assert_matches(model, (x,), projection_loss(seed))


@FEW
@given(
    batch=batches,
    kernel=st.integers(1, 4),
    padding=st.sampled_from([0, 1, "same", "valid"]),
    mode=st.sampled_from(["zeros", "reflect", "replicate"]),
    seed=st.integers(0, 2**16),
)
def test_conv1d(batch, kernel, padding, mode, seed):
    _seeded(seed)
    conv = nn.Conv1d(3, 2, kernel, padding=padding, padding_mode=mode)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(batch, 3, 8)
    model(x)
    assert_matches(model, (x,), projection_loss(seed))


class _EmbedBag(nn.Module):
    def __init__(self, vocab: int, dim: int, padding_idx: int | None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.fc = nn.Linear(dim, 2)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)).sum(1))


@FEW
@given(
    batch=batches,
    length=st.integers(1, 6),
    vocab=st.integers(2, 7),
    padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_embedding(batch, length, vocab, padding, seed):
    # small vocabularies make repeated ids within an example likely (their rows add up)
    _seeded(seed)
    model = _EmbedBag(vocab, 3, 0 if padding else None)
    assert_matches(model, (torch.randint(0, vocab, (batch, length)),), projection_loss(seed))


@FEW
@given(
    batch=batches,
    steps=st.integers(1, 4),
    width=st.integers(2, 6),
    two_dims=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_norm(batch, steps, width, two_dims, affine, seed):
    _seeded(seed)
    shape = (steps, width) if two_dims else (width,)
    model = nn.Sequential(
        nn.Linear(width, width), nn.LayerNorm(shape, elementwise_affine=affine), nn.Linear(width, 2)
    )
    assert_matches(model, (torch.randn(batch, steps, width),), projection_loss(seed))


@FEW
@given(batch=batches, groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_group_norm(batch, groups, seed):
    _seeded(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 2), nn.GroupNorm(groups, 4), nn.Flatten(), nn.Linear(4 * 3 * 3, 1)
    )
    assert_matches(model, (torch.randn(batch, 1, 4, 4),), projection_loss(seed))


class _Recurrent(nn.Module):
    def __init__(self, kind, layers, bidirectional, batch_first, bias, use_state):
        super().__init__()
        self.rnn = kind(
            3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
        )
        self.use_state = use_state
        self.lstm = kind is nn.LSTM

    def forward(self, x, h0):
        if self.use_state:
            state = (h0, torch.tanh(h0)) if self.lstm else h0
            out, final = self.rnn(x, state)
        else:
            out, final = self.rnn(x)
        h = final[0] if self.lstm else final
        weights = torch.linspace(-1, 1, out.shape[-1])
        return (out * weights).sum() + (h.square() * 0.5).sum()


@settings(max_examples=10, deadline=None)
@given(
    kind=st.sampled_from([nn.RNN, nn.GRU, nn.LSTM]),
    batch=batches,
    steps=st.integers(1, 4),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    use_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_recurrent(kind, batch, steps, layers, bidirectional, batch_first, bias, use_state, seed):
    _seeded(seed)
    model = _Recurrent(kind, layers, bidirectional, batch_first, bias, use_state)
    x = torch.randn(batch, steps, 3) if batch_first else torch.randn(steps, batch, 3)
    h0 = torch.randn(layers * (2 if bidirectional else 1), batch, 4)

    batch_dim = 0 if batch_first else 1
    ref_model = copy.deepcopy(model)
    rows = []
    for i in range(batch):  # one example at a time, through the real layer
        ref_model.zero_grad()
        ref_model(x.narrow(batch_dim, i, 1), h0.narrow(1, i, 1)).backward()
        rows.append(
            {
                n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in ref_model.named_parameters()
            }
        )
    ref = {n: torch.stack([r[n] for r in rows]) for n in rows[0]}
    psg = PerSampleGradients(model, loss_reduction="sum")
    try:
        model(x, h0).backward()
        got = psg.grad_samples()
        assert list(got) == list(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
        ref_norms = torch.sqrt(sum(g.reshape(batch, -1).square().sum(1) for g in ref.values()))
        torch.testing.assert_close(psg.norms(), ref_norms, atol=1e-5, rtol=1e-4)
    finally:
        psg.remove()


def test_mean_reduction_is_rescaled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    psg = PerSampleGradients(model, loss_reduction="mean")
    nn.functional.mse_loss(model(x), y).backward()
    mean_gs = psg.grad_samples()
    psg.clear()
    psg.loss_reduction = "sum"
    nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    for name, g in psg.grad_samples().items():
        torch.testing.assert_close(mean_gs[name], g)
    psg.remove()


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.a(h))  # called twice
        return self.b(h).sum(1, keepdim=True)


def test_shared_and_reused_parameters():
    torch.manual_seed(1)
    model = _Shared()
    assert_matches(model, (torch.randn(4, 3),), projection_loss())


def test_inplace_activation_after_layer():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 1))
    assert_matches(model, (torch.randn(7, 4),), projection_loss())


def test_empty_batch_adds_nothing():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    psg = PerSampleGradients(model)
    nn.functional.mse_loss(model(torch.zeros(0, 4)), torch.zeros(0, 1), reduction="sum").backward()
    outs = [torch.ones_like(p) for p in psg.params]
    norms = psg.clipped_sum(1.0, outs)
    assert norms.shape == (0,)
    assert all(torch.equal(o, torch.ones_like(o)) for o in outs)
    assert psg.grad_samples()["0.weight"].shape == (0, 3, 4)
    psg.remove()


def test_params_frozen_while_hooked_and_restored():
    model = nn.Sequential(nn.Linear(2, 2))
    psg = PerSampleGradients(model)
    assert not any(p.requires_grad for p in model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # no non-private gradient
    psg.remove()
    assert all(p.requires_grad for p in model.parameters())
    assert PerSampleGradients(model).params  # can be hooked again


def test_no_grad_forward_is_not_recorded():
    model = nn.Linear(2, 1)
    psg = PerSampleGradients(model)
    with torch.no_grad():
        model(torch.randn(3, 2))
    assert not psg.has_records
    with pytest.raises(NoPerSampleGradients, match="backward"):
        psg.norms()
    psg.remove()


def test_double_hooking_refused():
    model = nn.Linear(2, 1)
    psg = PerSampleGradients(model)
    with pytest.raises(ValueError, match="already"):
        PerSampleGradients(model)
    psg.remove()


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), r"BatchNorm1d at '1'.*mixes"),
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False)), "BatchNorm1d"),
        (lambda: nn.Sequential(nn.Linear(3, 3), _Custom()), r"_Custom at '1'.*no per-sample"),
        (lambda: nn.Sequential(nn.MultiheadAttention(4, 2)), "MultiheadAttention at '0'"),
        (lambda: nn.Sequential(nn.Conv3d(1, 1, 1)), "Conv3d"),
        (lambda: nn.InstanceNorm1d(3, track_running_stats=True), "InstanceNorm1d.*running"),
        (lambda: nn.LSTM(3, 4, proj_size=2), "LSTM.*proj_size"),
        (lambda: nn.GRU(3, 4, num_layers=2, dropout=0.5), "GRU.*dropout"),
        (lambda: nn.Embedding(5, 2, scale_grad_by_freq=True), "scale_grad_by_freq"),
    ],
)
def test_unsupported_layers_are_named(make, pattern):
    with pytest.raises(UnsupportedLayerError, match=pattern):
        PerSampleGradients(make())


def test_unsupported_layer_frozen_is_fine():
    model = nn.Sequential(nn.Linear(3, 3), _Custom())
    model[1].scale.requires_grad_(False)
    psg = PerSampleGradients(model)
    assert psg.names == ["0.weight", "0.bias"]
    psg.remove()


def test_register_grad_rule_adds_a_layer():
    from veil.dp import GradRule, register_grad_rule

    class ScaleRule(GradRule):
        def grad_samples(self, module, inputs, grads, trainable):
            return {"scale": inputs[0] * grads[0]}

    register_grad_rule(_Custom, ScaleRule())
    try:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(3, 3), _Custom(), nn.Linear(3, 1))
        assert_matches(model, (torch.randn(4, 3),), projection_loss())
    finally:
        from veil.dp._rules import _RULES

        _RULES.pop(_Custom)


def test_bad_arguments():
    with pytest.raises(TypeError):
        PerSampleGradients("not a module")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_reduction"):
        PerSampleGradients(nn.Linear(1, 1), loss_reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no trainable"):
        PerSampleGradients(nn.ReLU())
