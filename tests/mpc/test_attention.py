"""Scaled dot-product attention (and the layers built on it) on shared values, forward and
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

#: Weights carry the softmax's error (below 1e-3); outputs and gradients sum a few of them.
TOL = 3e-3


def sh(x: torch.Tensor):
    return shared(x, PARTIES, PROVIDER)


@settings(max_examples=12, deadline=None)
@given(
    st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 5),
    st.integers(1, 4), st.sampled_from(["none", "causal", "bool", "float", "scale"]),
    st.sampled_from([1, 2, 3]), st.data(),
)
def test_attention_and_its_gradients_match_plaintext(n, heads, length, keys, e, mask, group,
                                                      data):
    """Every mask kind, and grouped-query attention (``group`` query heads per key head)."""
    if mask == "causal":
        keys = length
    q = data.draw(tensors((n, heads * group, length, e), 2.0))
    k = data.draw(tensors((n, heads, keys, e), 2.0))
    v = data.draw(tensors((n, heads, keys, e), 2.0))
    kw: dict = {"enable_gqa": True} if group > 1 else {}
    if mask == "causal":
        kw["is_causal"] = True
    elif mask == "bool":
        allowed = data.draw(tensors((length, keys), 1.0)) > -0.5
        allowed[:, 0] = True  # every query attends to something
        kw["attn_mask"] = allowed
    elif mask == "float":
        kw["attn_mask"] = data.draw(tensors((length, keys), 1.0))
    elif mask == "scale":
        kw["scale"] = 0.4
    plain = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*plain, **kw)
    grad = torch.randn(ref.shape)
    ref.backward(grad)
    secure = [sh(t).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*secure, **kw)
    out.backward(sh(grad))
    assert torch.allclose(reveal(out), ref.double(), atol=TOL)
    for s, p in zip(secure, plain, strict=True):
        assert torch.allclose(reveal(s.grad), p.grad.double(), atol=TOL)


def test_logsumexp_output():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    out, lse = op(sh(q), sh(k), sh(v))
    ref_out, ref_lse = op(q, k, v)
    assert torch.allclose(reveal(out), ref_out.double(), atol=TOL)
    assert torch.allclose(reveal(lse), ref_lse.double(), atol=TOL)


def test_multihead_attention_and_a_transformer_layer_train_like_plaintext():
    torch.manual_seed(1)
    x, y = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    secure = copy.deepcopy(layer).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    for model, xb, yb in ((layer, x, y), (secure, sh(x), sh(y))):
        train_mse(model, xb, yb, steps=2, lr=0.05)
    for p, q in zip(secure.parameters(), layer.parameters(), strict=True):
        assert torch.allclose(reveal(p), q.detach().double(), atol=TOL)
    mha = nn.MultiheadAttention(6, 2, batch_first=True)
    shared_mha = copy.deepcopy(mha).fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: not attended
    ref = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    got = shared_mha(sh(x), sh(x), sh(x), attn_mask=mask, need_weights=False)[0]
    assert torch.allclose(reveal(got), ref.double(), atol=TOL)


def test_dropout_draws_a_public_mask_and_its_gradient_uses_it():
    torch.manual_seed(2)
    x, g = torch.randn(40, 50), torch.randn(40, 50)
    a = sh(x).requires_grad_()
    y = F.dropout(a, 0.25, training=True)
    y.backward(sh(g))
    out, grad = reveal(y), reveal(a.grad)
    kept = out != 0
    assert 0.7 < float(kept.double().mean()) < 0.8
    assert torch.allclose(out, x.double() / 0.75 * kept, atol=1e-4)
    assert torch.allclose(grad, g.double() / 0.75 * kept, atol=1e-4)
    assert torch.equal(reveal(F.dropout(a, 0.25, training=False)), reveal(a))
    # attention with dropout takes torch's math path, whose steps are all supported
    q = sh(torch.randn(1, 2, 3, 4))
    assert F.scaled_dot_product_attention(q, q, q, dropout_p=0.5).shape == (1, 2, 3, 4)
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.1, batch_first=True)
    secure = layer.fix_precision().share(*PARTIES, crypto_provider=PROVIDER)
    secure(sh(torch.randn(2, 5, 6))).sum().backward()  # training mode: dropout everywhere


def test_attention_heads_that_do_not_group_are_refused():
    q = sh(torch.randn(1, 3, 3, 4))
    kv = sh(torch.randn(1, 2, 3, 4))
    with pytest.raises((ValueError, RuntimeError), match=r"heads"):
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    with pytest.raises(ValueError, match=r"heads"):
        op(q, kv, kv)
