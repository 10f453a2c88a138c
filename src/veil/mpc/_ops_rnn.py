"""``nn.LSTM`` on FixedPrecisionTensors, forward and backward.

On the CPU torch runs each layer and direction of an LSTM as one ``mkldnn_rnn_layer`` op
(and its backward as ``mkldnn_rnn_layer_backward``); veil implements both with its own
protocols, so ``nn.LSTM`` (stacked, bidirectional, ``batch_first``, with or without biases)
runs unchanged on shared models and data. ``nn.GRU`` and ``nn.RNN`` need nothing here: torch
runs them as products and activations.

Forward, for a layer's time-major input ``x`` (T, N, I), weights ``W_ih`` (4H, I) and
``W_hh`` (4H, H), biases ``b_ih`` and ``b_hh``, initial states ``h_0`` and ``c_0``, and the
gates in torch's order ``i, f, g, o``:

1. ``X = x W_ih^T + b_ih + b_hh`` for all steps at once (one product);
2. at each step (from the last one when ``reverse``): ``G = X_t + h_prev W_hh^T`` (one
   product); the four gates from one sigmoid over ``[G_i, G_f, 2 G_g, G_o]``
   (``tanh(u) = 2 sigmoid(2u) - 1``); ``c = f c_prev + i g`` (two products, one round);
   ``h = o tanh(c)`` (one sigmoid, one product);
3. the gates, ``c`` and ``tanh(c)`` of every step are the op's workspace, which autograd
   keeps for the backward.

Backward, with ``dy`` the gradient of the outputs and ``dh``, ``dc`` those of the final
states: the derivative factors of every step are formed first, in two rounds for all steps
(``o (1 - tanh(c)^2)``, ``g i (1 - i)``, ``c_prev f (1 - f)``, ``i (1 - g^2)``,
``tanh(c) o (1 - o)``); then, from the last step processed back to the first (three rounds
per step)::

    dh = dy_t + dh;   dc = dc + dh o (1 - tanh(c)^2)
    dG = [dc g i(1-i), dc c_prev f(1-f), dc i (1-g^2), dh tanh(c) o(1-o)]
    dh = dG W_hh;     dc = dc f

and at the end ``dx = dG W_ih``, ``dW_ih = dG^T x``, ``dW_hh = dG^T h_prev`` and
``db = sum(dG)`` (for both biases), each one product over all steps.

Accuracy: that of :func:`~veil.mpc.approximations.sigmoid` (absolute error below 1e-4 for
gate pre-activations ``|G| <= 192``) and of ``tanh`` (below 2e-4), plus one truncation per
product; errors add up over the steps, as rounding does in plaintext. With ``proj_size``
torch takes its composite path instead (products and activations, all veil protocols).

Packed sequences (``pack_padded_sequence``, public lengths) run forward: packing is a public
selection of rows, and torch runs ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` on them with
products and activations. Their gradient and ``pad_packed_sequence`` raise a ``TypeError``:
torch's kernels for them build plain tensors, which cannot hold fixed-point values.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc import _values as V
from veil.mpc import approximations as A
from veil.mpc._ops_fixed import _binary_add, child_of, matmul, multiply
from veil.mpc.fixed import OPS, FixedPrecisionTensor

aten = torch.ops.aten
FPT = FixedPrecisionTensor
implements = OPS.implements

#: ``mode`` of ``mkldnn_rnn_layer`` for an LSTM (ideep's rnn_kind::LSTM).
_LSTM = 2


def _check(func: Any, mode: int, batch_sizes: Any) -> None:
    if mode != _LSTM:
        raise NotImplementedError(f"{func} with mode {mode} (only LSTM layers, mode 2)")
    if batch_sizes:
        raise NotImplementedError(f"{func}: packed sequences (PackedSequence) on shared values")


def _add(a: Any, b: Any) -> Any:
    """``a + b`` where either may be None (a gradient autograd did not send)."""
    if a is None:
        return b
    if b is None:
        return a
    return _binary_add(a, b, 1, False)


def _one_minus(x: Any) -> Any:
    return _binary_add(1.0, x, 1, True)


def _steps(length: int, reverse: bool) -> list[int]:
    """Time indices in the order the layer processes them."""
    return list(range(length - 1, -1, -1)) if reverse else list(range(length))


def _flat(x: Any) -> Any:
    return x.reshape(-1, x.shape[-1])


def _gates(pre: Any, hidden: int) -> tuple[Any, Any, Any, Any]:
    """``i, f, g, o`` from the pre-activations ``pre`` (N, 4H), with one sigmoid."""
    h = hidden
    doubled = torch.cat([pre[:, : 2 * h], multiply(pre[:, 2 * h : 3 * h], 2), pre[:, 3 * h :]], 1)
    s = A.sigmoid(doubled)
    g = _binary_add(multiply(s[:, 2 * h : 3 * h], 2), 1.0, 1, True)
    return s[:, :h], s[:, h : 2 * h], g, s[:, 3 * h :]


@implements(aten.mkldnn_rnn_layer)
def _lstm_layer(func: Any, args: Any, kwargs: Any) -> Any:
    x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, batch_sizes, mode, hidden = args[:11]
    has_biases = args[12]
    _check(func, mode, batch_sizes)
    length, batch = x.shape[0], x.shape[1]
    pre = matmul(_flat(x), w_ih.t())
    if has_biases:
        pre = _add(pre, _add(b_ih, b_hh))
    pre = pre.reshape(length, batch, 4 * hidden)
    h, c = hx.reshape(batch, hidden), cx.reshape(batch, hidden)
    outputs: list[Any] = [None] * length
    saved = []
    for t in _steps(length, reverse):
        i, f, g, o = _gates(_add(pre[t], matmul(h, w_hh.t())), hidden)
        c = _add(multiply(f, c), multiply(i, g))
        tc = A.tanh(c)
        h = multiply(o, tc)
        outputs[t] = h
        saved.append(torch.cat([i, f, g, o, c, tc], 1))
    workspace = torch.stack(saved)  # in processing order
    return torch.stack(outputs), h.reshape(hx.shape), c.reshape(cx.shape), workspace


@implements(aten.mkldnn_rnn_layer_backward)
def _lstm_layer_backward(func: Any, args: Any, kwargs: Any) -> Any:
    x, w_ih, w_hh, b_ih, _, hx, cx, output = args[:8]
    grad_out, grad_hy, grad_cy, reverse, mode, hidden = args[10:16]
    has_biases, batch_sizes, workspace = args[17], args[20], args[22]
    _check(func, mode, batch_sizes)
    length, batch, hd = x.shape[0], x.shape[1], hidden
    order = _steps(length, reverse)
    ws = workspace
    i, f, g, o, c, tc = (ws[..., j * hd : (j + 1) * hd] for j in range(6))
    h0, c0 = hx.reshape(batch, hd), cx.reshape(batch, hd)
    # Derivative factors of every step: two rounds for all of them.
    tc2, i2, f2, g2, o2 = (multiply(v, v) for v in (tc, i, f, g, o))
    cell_o = multiply(o, _one_minus(tc2))  # o (1 - tanh(c)^2)
    fac_i = multiply(g, _binary_add(i, i2, 1, True))  # g i (1 - i)
    f_f = _binary_add(f, f2, 1, True)  # f (1 - f), times c_prev below
    fac_f_first = multiply(c0, f_f[0])
    fac_f_rest = multiply(c[:-1], f_f[1:]) if length > 1 else None
    fac_g = multiply(i, _one_minus(g2))  # i (1 - g^2)
    fac_o = multiply(tc, _binary_add(o, o2, 1, True))  # tanh(c) o (1 - o)
    dh = None if grad_hy is None else grad_hy.reshape(batch, hd)
    dc = None if grad_cy is None else grad_cy.reshape(batch, hd)
    grads: list[Any] = [None] * length
    for k in range(length - 1, -1, -1):
        if grad_out is not None:
            dh = _add(grad_out[order[k]], dh)
        fac_f = fac_f_first if k == 0 else fac_f_rest[k - 1]
        if dh is None:  # nothing flows into this step's output or later ones
            dgo = None
        else:
            dc = _add(dc, multiply(dh, cell_o[k]))
            dgo = multiply(dh, fac_o[k])
        if dc is None:
            zero = torch.zeros(batch, hd)
            parts = [zero, zero, zero, zero if dgo is None else dgo]
        else:
            parts = [multiply(dc, fac_i[k]), multiply(dc, fac_f), multiply(dc, fac_g[k])]
            parts.append(dgo if dgo is not None else torch.zeros(batch, hd))
            dc = multiply(dc, f[k])
        grads[k] = _cat_mixed(parts)
        dh = matmul(grads[k], w_hh)
    d_gates = torch.stack(grads)  # (T, N, 4H), processing order
    x_proc = x.flip(0) if reverse else x
    flat_dg = _flat(d_gates)
    dx = matmul(flat_dg, w_ih).reshape(x.shape)
    if reverse:
        dx = dx.flip(0)
    dw_ih = matmul(flat_dg.t(), _flat(x_proc))
    dw_hh = matmul(d_gates[0].t(), h0)
    if length > 1:
        h_proc = output.flip(0) if reverse else output
        dw_hh = _add(dw_hh, matmul(_flat(d_gates[1:]).t(), _flat(h_proc[:-1])))
    db = flat_dg.sum(0)
    if not has_biases:
        db = torch.zeros(b_ih.shape[0])
    dcx = dc if dc is not None else torch.zeros(batch, hd)
    return dx, dw_ih, dw_hh, db, db, dh.reshape(hx.shape), dcx.reshape(cx.shape)


@implements(aten._pack_padded_sequence)
def _pack_padded(func: Any, args: Any, kwargs: Any) -> Any:
    """``pack_padded_sequence``: the lengths are public, so packing is a public selection of
    rows (local): those torch itself picks when it packs the rows' numbers."""
    x, lengths, batch_first = args[0], args[1], args[2]
    if type(lengths) is not torch.Tensor:
        raise NotImplementedError(f"{func}: secret lengths")
    lead = (x.shape[0], x.shape[1])
    numbers = torch.arange(lead[0] * lead[1], dtype=torch.float64).reshape(lead)
    positions, batch_sizes = aten._pack_padded_sequence.default(numbers, lengths, batch_first)
    rows = V.shape_op(child_of(x), "reshape", [lead[0] * lead[1], *x.shape[2:]])
    data = FPT(V.shape_op(rows, "index", [positions.long()]), x.precision_bits, x.dtype)
    return data, batch_sizes


def _cat_mixed(parts: list[Any]) -> Any:
    """``cat(parts, 1)`` where some parts are public zeros (sent as shared zeros)."""
    ref = next((p for p in parts if type(p) is FPT), None)
    if ref is None:
        return torch.cat(parts, 1)
    return torch.cat([p if type(p) is FPT else multiply(ref, 0) for p in parts], 1)


__all__: list[str] = []
