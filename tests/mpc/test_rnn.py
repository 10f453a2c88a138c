"""``nn.LSTM`` on shared values (veil's ``mkldnn_rnn_layer`` and its backward), forward and
backward, against plaintext."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.mpc.helpers import local_parties, reveal, shared, tensors, train_mse

PARTIES, PROVIDER = local_parties(2)

#: Gates carry the sigmoid's error (below 1e-4); a few steps and layers add them up.
TOL = 2e-3


def sh(x: torch.Tensor):
    return shared(x, PARTIES, PROVIDER)


def secure_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)


@settings(max_examples=10, deadline=None)
@given(
    st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
    st.integers(1, 2), st.booleans(), st.booleans(), st.booleans(),
    st.sampled_from(["none", "given"]), st.sampled_from(["all", "output", "final"]), st.data(),
)
def test_lstm_and_its_gradients_match_plaintext(
    length, batch, size, hidden, layers, bidirectional, batch_first, bias, state, used, data
):
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    lstm = nn.LSTM(size, hidden, num_layers=layers, bidirectional=bidirectional,
                   batch_first=batch_first, bias=bias)
    secure = secure_copy(lstm)
    dims = (batch, length, size) if batch_first else (length, batch, size)
    x = data.draw(tensors(dims, 2.0))
    states = layers * (2 if bidirectional else 1), batch, hidden
    h0, c0 = data.draw(tensors(states, 1.0)), data.draw(tensors(states, 1.0))
    plain_in = [t.clone().requires_grad_() for t in (x, h0, c0)]
    secure_in = [sh(t).requires_grad_() for t in (x, h0, c0)]
    results = []
    for model, (xi, hi, ci) in ((lstm, plain_in), (secure, secure_in)):
        out, (hn, cn) = model(xi, (hi, ci)) if state == "given" else model(xi)
        loss = {"all": (out * out).sum() + hn.sum() + (cn * cn).sum(),
                "output": (out * out).sum(), "final": hn.sum() + cn.sum()}[used]
        loss.backward()
        results.append((out, hn, cn))
    for s, p in zip(results[1], results[0], strict=True):
        assert torch.allclose(reveal(s), p.detach().double(), atol=TOL)
    for (name, p), q in zip(lstm.named_parameters(), secure.parameters(), strict=True):
        assert torch.allclose(reveal(q.grad), p.grad.double(), atol=TOL), name
    assert torch.allclose(reveal(secure_in[0].grad), plain_in[0].grad.double(), atol=TOL)
    if state == "given":
        for s, p in zip(secure_in[1:], plain_in[1:], strict=True):
            assert torch.allclose(reveal(s.grad), p.grad.double(), atol=TOL)


def test_an_lstm_classifier_trains_like_plaintext():
    torch.manual_seed(3)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _, (h, _) = self.lstm(x)
            return self.head(h[-1])

    model = Classifier()
    secure = secure_copy(model)
    x, y = torch.randn(4, 5, 3), torch.tensor([0, 1, 1, 0])
    onehot = F.one_hot(y, 2).float()
    for m, xb, yb in ((model, x, onehot), (secure, sh(x), sh(onehot))):
        train_mse(m, xb, yb, steps=3, lr=0.5)
    for p, q in zip(model.parameters(), secure.parameters(), strict=True):
        assert torch.allclose(reveal(q.detach()), p.detach().double(), atol=TOL)


def test_projections_and_dropout_between_layers_run():
    torch.manual_seed(4)
    x = torch.randn(3, 2, 4)
    lstm = nn.LSTM(4, 5, proj_size=3)  # torch's composite path: products and activations
    with pytest.warns(UserWarning, match="projections"):
        out = secure_copy(lstm)(sh(x))[0]
    assert torch.allclose(reveal(out), lstm(x)[0].detach().double(), atol=TOL)
    stacked = secure_copy(nn.LSTM(4, 5, num_layers=2, dropout=0.5))
    assert stacked(sh(x))[0].shape == (3, 2, 5)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_packed_sequences_run_forward(kind):
    """Variable-length batches: packing is a public selection of rows; the final states and
    the packed outputs match plaintext. Training through them raises a TypeError naming the
    cause (torch builds their gradient as a plain tensor)."""
    torch.manual_seed(6)
    layer = kind(3, 4)
    secure = secure_copy(layer)
    x, lengths = torch.randn(5, 3, 3), torch.tensor([5, 3, 2])
    packed = nn.utils.rnn.pack_padded_sequence(sh(x).requires_grad_(), lengths)
    out, state = secure(packed)
    ref_out, ref_state = layer(nn.utils.rnn.pack_padded_sequence(x, lengths))
    final, ref_final = (state[0], ref_state[0]) if kind is nn.LSTM else (state, ref_state)
    assert torch.allclose(reveal(final), ref_final.detach().double(), atol=TOL)
    assert torch.allclose(reveal(out.data), ref_out.data.detach().double(), atol=TOL)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    with pytest.raises(TypeError, match="packed sequences"):
        final.sum().backward()
    with pytest.raises(TypeError, match="pad_packed_sequence"):
        nn.utils.rnn.pad_packed_sequence(out)


def test_other_recurrent_layer_modes_are_refused():
    op = torch.ops.aten.mkldnn_rnn_layer.default
    x, w = sh(torch.randn(2, 1, 3)), sh(torch.randn(12, 3))
    u, b = sh(torch.randn(12, 4)), sh(torch.randn(12))
    h = torch.zeros(1, 4)
    with pytest.raises(NotImplementedError, match="mode 3"):
        op(x, w, u, b, b, h, h, False, [], 3, 4, 1, True, False, False, False)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_elman_rnn_runs_as_products_and_activations(nonlinearity):
    torch.manual_seed(5)
    rnn = nn.RNN(3, 4, nonlinearity=nonlinearity, batch_first=True)
    secure = secure_copy(rnn)
    x = torch.randn(2, 3, 3)
    out = secure(sh(x))[0]
    out.sum().backward()
    rnn(x)[0].sum().backward()
    assert torch.allclose(reveal(out), rnn(x)[0].detach().double(), atol=TOL)
    for p, q in zip(rnn.parameters(), secure.parameters(), strict=True):
        assert torch.allclose(reveal(q.grad), p.grad.double(), atol=TOL)
