"""Per-sample gradients for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``.

PyTorch's fused recurrent kernels have no batching rule for ``torch.func.vmap``, so the rule
replays the layer's recurrence in plain tensor operations (the equations of the PyTorch docs),
with every weight expanded to one copy per example: the gradient of the replay with respect to
the expanded copy is the per-example gradient. The replay's inputs are what the hooked call saw,
and it is checked against a per-example loop over the real layer in the tests.

Supported: any ``num_layers``, ``bidirectional``, ``batch_first`` either way, with or without
bias, an initial state or not. Not supported (clear error): ``PackedSequence`` inputs, unbatched
inputs, ``proj_size > 0`` (LSTM) and ``dropout > 0`` between layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from veil.dp._checks import UnsupportedLayerError
from veil.dp._rules import GradRule, register_grad_rule


def _cell(
    kind: str,
    x_proj: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    nonlinearity: str,
) -> tuple[Tensor, Tensor | None]:
    """One step for a batch; ``w_hh`` is per-example ``(batch, gates*hidden, hidden)``."""
    hp = torch.bmm(w_hh, h.unsqueeze(2)).squeeze(2)
    if b_hh is not None:
        hp = hp + b_hh
    if kind == "RNN":
        pre = x_proj + hp
        return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)), None
    if kind == "GRU":
        i_r, i_z, i_n = x_proj.chunk(3, dim=1)
        h_r, h_z, h_n = hp.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    i, f, g, o = (x_proj + hp).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class RecurrentRule(GradRule):
    """Per-sample gradients of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` by a replay."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def check(self, module: nn.Module, path: str) -> None:
        where = f"{type(module).__name__} at {path!r}"
        if getattr(module, "proj_size", 0):
            raise UnsupportedLayerError(f"{where}: proj_size > 0 is not supported by DP-SGD")
        if module.dropout:
            raise UnsupportedLayerError(
                f"{where}: dropout between recurrent layers is not supported by DP-SGD "
                "(its masks cannot be replayed); use dropout=0 and nn.Dropout outside"
            )

    def param_names(self, module: nn.Module) -> list[str]:
        return list(module._flat_weights_names)

    def probe(self, output: Any) -> tuple[Any, list[Tensor]]:
        out, state = output
        tensors = [out, *state] if isinstance(state, tuple) else [out, state]
        probes = [torch.zeros_like(t, requires_grad=True) for t in tensors]
        probed = [t + p for t, p in zip(tensors, probes)]
        new_state = tuple(probed[1:]) if isinstance(state, tuple) else probed[1]
        return (probed[0], new_state), probes

    def batch_size(self, module: nn.Module, inputs: tuple[Any, ...]) -> int:
        return int(inputs[0].shape[0 if module.batch_first else 1])

    def grad_samples(self, module, inputs, grads, trainable):
        x = inputs[0]
        if not isinstance(x, Tensor):
            raise UnsupportedLayerError(
                f"{type(module).__name__}: PackedSequence inputs are not supported by DP-SGD; "
                "pad the sequences instead"
            )
        if x.dim() != 3:
            raise UnsupportedLayerError(
                f"{type(module).__name__} needs batched 3-D input for per-sample gradients, "
                f"got shape {tuple(x.shape)}"
            )
        hx = inputs[1] if len(inputs) > 1 else None
        names = [n for n in self.param_names(module) if n in trainable]
        with torch.enable_grad():
            outputs, expanded = self._replay(module, x.detach(), hx, names)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
            total = sum((o * g).sum() for o, g in pairs)
            wanted = [expanded[n] for n in names]
            got = torch.autograd.grad(total, wanted, allow_unused=True) if wanted else ()
        return {
            n: (g if g is not None else torch.zeros_like(w)) for n, g, w in zip(names, got, wanted)
        }

    def _replay(
        self, module: nn.Module, x: Tensor, hx: Any, names: list[str]
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        if not module.batch_first:
            x = x.transpose(0, 1)
        batch, steps = x.shape[0], x.shape[1]
        dirs = 2 if module.bidirectional else 1
        hidden = module.hidden_size
        expanded: dict[str, Tensor] = {}

        def weight(name: str) -> Tensor | None:
            p = getattr(module, name, None)
            if p is None:
                return None
            w = p.detach().unsqueeze(0).expand(batch, *p.shape)
            if name in names:
                w = w.requires_grad_()
                expanded[name] = w
            return w

        if hx is None:
            h0 = x.new_zeros(module.num_layers * dirs, batch, hidden)
            c0 = h0 if self.kind == "LSTM" else None
        elif self.kind == "LSTM":
            h0, c0 = (t.detach() for t in hx)
        else:
            h0, c0 = hx.detach(), None
        layer_in = x
        h_n, c_n = [], []
        for layer in range(module.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = weight("weight_ih" + sfx), weight("weight_hh" + sfx)
                b_ih, b_hh = weight("bias_ih" + sfx), weight("bias_hh" + sfx)
                proj = torch.einsum("bti,bgi->btg", layer_in, w_ih)
                if b_ih is not None:
                    proj = proj + b_ih.unsqueeze(1)
                k = layer * dirs + d
                h = h0[k]
                c = c0[k] if c0 is not None else None
                seq: list[Tensor] = []
                order = range(steps - 1, -1, -1) if d else range(steps)
                for t in order:
                    h, c = _cell(
                        self.kind,
                        proj[:, t],
                        h,
                        c,
                        w_hh,
                        b_hh,
                        module.nonlinearity if self.kind == "RNN" else "tanh",
                    )
                    seq.append(h)
                if d:
                    seq.reverse()
                outs.append(torch.stack(seq, 1) if seq else x.new_zeros(batch, 0, hidden))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0]
        out = layer_in if module.batch_first else layer_in.transpose(0, 1)
        result = [out, torch.stack(h_n, 0)]
        if self.kind == "LSTM":
            result.append(torch.stack(c_n, 0))
        return result, expanded


for _kind, _cls in (("RNN", nn.RNN), ("GRU", nn.GRU), ("LSTM", nn.LSTM)):
    register_grad_rule(_cls, RecurrentRule(_kind))
