"""Scaled dot-product attention on FixedPrecisionTensors (``F.scaled_dot_product_attention``,
hence ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``), forward and backward.

On the CPU torch runs attention as ``_scaled_dot_product_flash_attention_for_cpu``; veil
implements that op and its backward with its own protocols:

1. ``S = Q K^T * scale`` (a shared product, truncated), plus a public bias of ``-64`` on
   masked positions (``is_causal`` or a boolean ``attn_mask``; a float mask is added);
2. ``m = max(S)`` over the keys (exact comparisons), ``e = exp(S - m)`` times the public
   0/1 keep-mask (masked weights are exactly 0), ``z = sum(e)``, ``P = e / z`` (Newton
   reciprocal), ``O = P V``; the ``logsumexp`` output is ``m + log(z)``;
3. backward, with ``P`` recomputed (or kept from the forward): ``dV = P^T dO``,
   ``dP = dO V^T``, ``dS = P (dP - rowsum(dP P))`` (softmax's own backward),
   ``dQ = dS K scale``, ``dK = dS^T Q scale``.

Accuracy is that of :func:`veil.mpc.approximations.softmax`: scores within 320 of their
row's maximum (the domain of ``exp``), any number of keys, absolute error of the weights
below 1e-3; ``logsumexp`` adds ``log``'s error (below 2e-5). Grouped-query attention
(``enable_gqa=True``: fewer key and value heads than query heads) repeats each key and value
head for its group of query heads (local, as torch's math path does) and sums their
gradients back over the group. With ``dropout_p > 0`` torch takes its math path instead
(products, softmax and a public dropout mask, all veil protocols).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import approximations as A
from veil.mpc._ops_fixed import child_of, fixed_pair, matmul, multiply
from veil.mpc._ops_nn import softmax_backward
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements

#: Added to masked scores before the maximum (their weights are then zeroed exactly).
_MASKED = -64.0


def _check(func: Any, q: Any, k: Any, v: Any, dropout_p: float) -> None:
    if dropout_p:
        raise NotImplementedError(f"{func}: dropout inside attention (dropout_p={dropout_p})")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise NotImplementedError(f"{func}: query, key and value must be 4-D (N, H, L, E)")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{func}: {q.shape[1]} query heads, {k.shape[1]} key and {v.shape[1]} value heads "
            "(key and value heads must be equal and divide the query heads)"
        )


def _repeat_heads(x: Any, group: int) -> Any:
    """Grouped-query attention: each of ``x``'s heads repeated for its ``group`` query
    heads, as torch's ``repeat_interleave`` along the heads (local)."""
    if group == 1:
        return x
    index = torch.arange(x.shape[1]).repeat_interleave(group)
    return FPT(V.shape_op(child_of(x), "index_select", 1, index), x.precision_bits, x.dtype)


def _fold_heads(grad: Any, group: int) -> Any:
    """The gradient of :func:`_repeat_heads`: each group's gradients summed (local)."""
    if group == 1:
        return grad
    n, heads = grad.shape[0], grad.shape[1]
    c = V.shape_op(child_of(grad), "reshape", [n, heads // group, group, *grad.shape[2:]])
    return FPT(V.shape_op(c, "sum", [2]), grad.precision_bits, grad.dtype)


def _keep_and_bias(
    q: Any, k: Any, is_causal: bool, attn_mask: Any
) -> tuple[torch.Tensor | None, Any]:
    """The public 0/1 mask of attended positions (None: all) and the bias added to scores."""
    length, keys = q.shape[-2], k.shape[-2]
    keep = None
    bias: Any = None
    if is_causal:
        keep = torch.ones(length, keys, dtype=torch.bool).tril()
    if attn_mask is not None:
        if type(attn_mask) is not FPT and attn_mask.dtype is torch.bool:
            allowed = attn_mask
        elif type(attn_mask) is not FPT:  # torch turns a boolean mask into 0 / -inf
            allowed = attn_mask != float("-inf")
            bias = attn_mask.masked_fill(~allowed, 0.0)
            allowed = None if bool(allowed.all()) else allowed
        elif attn_mask.dtype is torch.bool:
            raise NotImplementedError("a secret boolean attention mask")
        else:
            allowed, bias = None, attn_mask  # a secret additive mask
        if allowed is not None:
            keep = allowed if keep is None else keep & allowed
    if keep is not None:
        masked = torch.where(keep, 0.0, _MASKED)
        bias = masked if bias is None else bias + masked
    return keep, bias


def _weights(q: Any, k: Any, is_causal: bool, attn_mask: Any, scale_: float) -> tuple[Any, Any]:
    """``(P, logsumexp)``: the attention weights and ``m + log(sum(e))``, as FPTs."""
    f = q.precision_bits
    scores = multiply(matmul(q, k.transpose(-2, -1)), scale_)
    keep, bias = _keep_and_bias(q, k, is_causal, attn_mask)
    if bias is not None:
        cs, cb, f, _ = fixed_pair(scores, bias)
        scores = FPT(V.add(cs, cb), f, q.dtype)
    m, e, total = A.shifted_exp(scores, -1, keep)
    weights = FPT(V.product(e, A._reciprocal_positive(total, f), "mul", (), f), f, q.dtype)
    lse = A.log(FPT(total, f, q.dtype))
    lse = FPT(V.shape_op(V.add(child_of(lse), m), "squeeze.dim", -1), f, q.dtype)
    return weights, lse


def _scale(q: Any, given: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if given is None else float(given)


@implements(aten._scaled_dot_product_flash_attention_for_cpu)
def _attention(func: Any, args: Any, kwargs: Any) -> Any:
    q, k, v = args[:3]
    dropout_p = args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)
    is_causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
    attn_mask, given = kwargs.get("attn_mask"), kwargs.get("scale")
    _check(func, q, k, v, dropout_p)
    group = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, group), _repeat_heads(v, group)
    weights, lse = _weights(q, k, is_causal, attn_mask, _scale(q, given))
    out = matmul(weights, v)
    out.cache = {"attention_weights": weights}
    return out, lse


@implements(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _attention_backward(func: Any, args: Any, kwargs: Any) -> Any:
    grad, q, k, v, out = args[:5]
    dropout_p, is_causal = args[6], args[7]
    attn_mask, given = kwargs.get("attn_mask"), kwargs.get("scale")
    _check(func, q, k, v, dropout_p)
    group = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, group), _repeat_heads(v, group)
    s = _scale(q, given)
    cache = getattr(out, "cache", None) or {}
    weights = cache.get("attention_weights")
    if weights is None:
        weights, _ = _weights(q, k, is_causal, attn_mask, s)
    grad_v = matmul(weights.transpose(-2, -1), grad)
    grad_s = softmax_backward(matmul(grad, v.transpose(-2, -1)), weights, -1)
    grad_q = multiply(matmul(grad_s, k), s)
    grad_k = multiply(matmul(grad_s.transpose(-2, -1), q), s)
    return grad_q, _fold_heads(grad_k, group), _fold_heads(grad_v, group)


__all__: list[str] = []
