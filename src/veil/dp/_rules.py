"""Per-sample gradient rules for the layers veil's DP-SGD supports.

A rule turns what a layer saw in one call (its inputs, and the gradient of the loss with
respect to its outputs, captured by hooks) into per-sample gradients of the layer's own
parameters. Rules may also offer two shortcuts DP-SGD uses when a layer was called once per
step: the squared per-sample gradient norms and the weighted sum ``sum_i w_i g_i``, both
without building the ``(batch, *param.shape)`` tensors ("ghost" norms; for a linear layer on
2-D input, ``||g_i||^2 = ||a_i||^2 ||b_i||^2`` for the weight, ``||b_i||^2`` for the bias).

Rules exist for ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``,
``nn.LayerNorm``, ``nn.GroupNorm`` and (in :mod:`veil.dp._rnn`) ``nn.RNN``, ``nn.GRU`` and
``nn.LSTM``. Layer types match exactly (a subclass may change ``forward``); other types can be
added with :func:`register_grad_rule`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.dp._checks import UnsupportedLayerError

Grads = Sequence[Tensor | None]


class GradRule:
    """How one layer type gives per-sample gradients (subclass to support a new layer).

    ``inputs`` are the positional inputs of one call (batch first unless the rule says
    otherwise) and ``grads`` the gradients of the loss with respect to the call's outputs, as
    listed by :meth:`probe` (``None`` where an output did not reach the loss; a call none of
    whose outputs reached the loss is skipped, so single-output rules never see ``None``).
    ``trainable`` holds the local names of the parameters to give gradients for (while a model
    is private its parameters have ``requires_grad=False``; see :mod:`veil.dp._grad_sample`).
    """

    #: whether :meth:`norms_sq` and :meth:`accumulate` avoid materializing per-sample grads
    ghost = False

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`UnsupportedLayerError` if this instance's configuration is unsupported."""

    def param_names(self, module: nn.Module) -> list[str]:
        """Local names of the parameters this rule gives gradients for, in a fixed order."""
        return [name for name, _ in module.named_parameters(recurse=False)]

    def probe(self, output: Any) -> tuple[Any, list[Tensor]]:
        """The call's output with a zero "probe" leaf added to each tensor whose gradient the
        rule needs, and the probes (after ``backward`` their ``.grad`` is that gradient)."""
        p = torch.zeros_like(output, requires_grad=True)
        return output + p, [p]

    def batch_size(self, module: nn.Module, inputs: tuple[Any, ...]) -> int:
        return int(inputs[0].shape[0])

    def grad_samples(
        self, module: nn.Module, inputs: tuple[Any, ...], grads: Grads, trainable: frozenset[str]
    ) -> dict[str, Tensor]:
        """Per-sample gradients ``{local name: (batch, *param.shape)}`` of trainable params."""
        raise NotImplementedError

    def norms_sq(
        self, module: nn.Module, inputs: tuple[Any, ...], grads: Grads, trainable: frozenset[str]
    ) -> tuple[Tensor, Any]:
        """Squared per-sample gradient norms over the trainable params, and a cache token."""
        gs = self.grad_samples(module, inputs, grads, trainable)
        return _sum_sq(gs.values(), self.batch_size(module, inputs), inputs), gs

    def accumulate(
        self,
        module: nn.Module,
        inputs: tuple[Any, ...],
        grads: Grads,
        weights: Tensor,
        outs: Sequence[Tensor | None],
        cache: Any,
    ) -> None:
        """Add ``sum_i weights[i] * g_i`` into ``outs`` (aligned with :meth:`param_names`; None
        for parameters that are not trainable); ``cache`` is what :meth:`norms_sq` returned."""
        trainable = frozenset(n for n, o in zip(self.param_names(module), outs) if o is not None)
        gs = cache if cache is not None else self.grad_samples(module, inputs, grads, trainable)
        for name, out in zip(self.param_names(module), outs):
            if out is not None and name in gs:
                out.add_(torch.tensordot(weights, gs[name], dims=1))


def _sum_sq(tensors: Any, batch: int, inputs: tuple[Any, ...]) -> Tensor:
    total: Tensor | None = None
    for g in tensors:
        s = torch.linalg.vector_norm(g.reshape(g.shape[0], math.prod(g.shape[1:])), dim=1).square()
        total = s if total is None else total.add_(s)
    if total is None:
        return torch.zeros(batch, dtype=inputs[0].dtype)
    return total


class LinearRule(GradRule):
    """``nn.Linear`` on ``(batch, ..., in)``: ghost norms and one matmul per weighted sum."""

    ghost = True

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight", "bias"]

    @staticmethod
    def _as_3d(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        steps = math.prod(a.shape[1:-1])  # 1 for 2-D input; explicit so empty batches work
        return (
            a.reshape(a.shape[0], steps, a.shape[-1]),
            b.reshape(b.shape[0], steps, b.shape[-1]),
        )

    def grad_samples(self, module, inputs, grads, trainable):
        a3, b3 = self._as_3d(inputs[0], grads[0])
        out = {}
        if "weight" in trainable:
            out["weight"] = torch.bmm(b3.transpose(1, 2), a3)
        if "bias" in trainable:
            out["bias"] = b3.sum(1)
        return out

    def norms_sq(self, module, inputs, grads, trainable):
        a, b = inputs[0], grads[0]
        w, bias = "weight" in trainable, "bias" in trainable
        if a.dim() == 2:
            bb = torch.linalg.vecdot(b, b)
            if not w:
                return (bb if bias else torch.zeros_like(bb)), None
            aa = torch.linalg.vecdot(a, a)
            return (torch.addcmul(bb, aa, bb) if bias else aa.mul_(bb)), None
        a3, b3 = self._as_3d(a, b)
        batch, steps, d_in = a3.shape
        d_out = b3.shape[2]
        total = a.new_zeros(batch)
        if w:
            if steps * (d_in + d_out) < d_in * d_out:
                # ||sum_t b_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(b_t . b_s)
                gram = torch.bmm(a3, a3.transpose(1, 2)).mul_(torch.bmm(b3, b3.transpose(1, 2)))
                total += gram.sum((1, 2))
            else:
                gw = torch.bmm(b3.transpose(1, 2), a3)
                total += torch.linalg.vector_norm(
                    gw.reshape(batch, math.prod(gw.shape[1:])), dim=1
                ).square()
        if bias:
            bsum = b3.sum(1)
            total += torch.linalg.vecdot(bsum, bsum)
        return total, None

    def accumulate(self, module, inputs, grads, weights, outs, cache):
        a, b = inputs[0], grads[0]
        wout, bout = outs
        if a.dim() == 2:
            if wout is not None:
                wout.addmm_((b * weights.unsqueeze(1)).t(), a)
            if bout is not None:
                bout.addmv_(b.t(), weights)
            return
        a3, b3 = self._as_3d(a, b)
        bw = (b3 * weights.view(-1, 1, 1)).reshape(-1, b3.shape[2])
        if wout is not None:
            wout.addmm_(bw.t(), a3.reshape(-1, a3.shape[2]))
        if bout is not None:
            bout.add_(bw.sum(0))


def _conv_pad(module: nn.Module, x: Tensor, dims: int) -> tuple[Tensor, tuple[int, ...]]:
    """Input padded as the layer pads it; the padding left for ``unfold`` to apply."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0,) * dims
        # "same": total padding d * (k - 1), the extra one on the right/bottom (as torch does)
        pads: list[int] = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, pads, mode=mode), (0,) * dims
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (
            0,
        ) * dims
    return x, tuple(padding)


class ConvRule(GradRule):
    """``nn.Conv1d`` / ``nn.Conv2d``: per-sample grads from unfolded input patches."""

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight", "bias"]

    def grad_samples(self, module, inputs, grads, trainable):
        x, g = inputs[0], grads[0]
        if x.dim() != self.dims + 2:
            raise UnsupportedLayerError(
                f"{type(module).__name__} needs batched input of {self.dims + 2} dims for "
                f"per-sample gradients, got shape {tuple(x.shape)}"
            )
        batch = x.shape[0]
        x, padding = _conv_pad(module, x, self.dims)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if self.dims == 1:
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
            padding = (0, *padding)
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        groups, c_out = module.groups, module.out_channels
        g3 = g.reshape(batch, groups, c_out // groups, -1)
        out = {}
        if "weight" in trainable:
            cols = cols.reshape(batch, groups, -1, cols.shape[-1])
            gw = torch.einsum("bgol,bgil->bgoi", g3, cols)
            out["weight"] = gw.reshape(batch, *module.weight.shape)
        if "bias" in trainable:
            out["bias"] = g3.sum(3).reshape(batch, c_out)
        return out


class EmbeddingRule(GradRule):
    """``nn.Embedding``: ghost norms by summing rows per (sample, token id)."""

    ghost = True

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight"]

    def check(self, module: nn.Module, path: str) -> None:
        if module.scale_grad_by_freq:
            raise UnsupportedLayerError(
                f"Embedding at {path!r} has scale_grad_by_freq=True, which scales each "
                "example's gradient by counts over the whole batch; DP-SGD needs it False"
            )

    def _rows(self, module: nn.Module, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Flat row ids ``sample * num_embeddings + id`` and their gradient rows."""
        batch, dim = ids.shape[0], g.shape[-1]
        ids = ids.reshape(batch, -1)
        rows = g.reshape(batch, -1, dim)
        if module.padding_idx is not None:
            keep = ids != module.padding_idx
            rows = rows * keep.unsqueeze(-1).to(rows.dtype)
        offsets = torch.arange(batch, device=ids.device).unsqueeze(1) * module.num_embeddings
        return (ids + offsets).reshape(-1), rows.reshape(-1, dim)

    def grad_samples(self, module, inputs, grads, trainable):
        ids, g = inputs[0], grads[0]
        batch = ids.shape[0]
        weight = module.weight
        gs = weight.new_zeros(batch * module.num_embeddings, weight.shape[1])
        if "weight" in trainable and ids.numel() > 0:
            keys, rows = self._rows(module, ids, g)
            gs.index_add_(0, keys, rows.to(gs.dtype))
        return {"weight": gs.reshape(batch, *weight.shape)} if "weight" in trainable else {}

    def norms_sq(self, module, inputs, grads, trainable):
        ids, g = inputs[0], grads[0]
        batch = ids.shape[0]
        total = module.weight.new_zeros(batch)
        if "weight" not in trainable or ids.numel() == 0:
            return total, None
        keys, rows = self._rows(module, ids, g)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = rows.new_zeros(uniq.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
        total.index_add_(0, uniq // module.num_embeddings, torch.linalg.vecdot(sums, sums))
        return total, None

    def accumulate(self, module, inputs, grads, weights, outs, cache):
        ids, g = inputs[0], grads[0]
        if outs[0] is None or ids.numel() == 0:
            return
        batch = ids.shape[0]
        keys, rows = self._rows(module, ids, g)
        per_token = weights.repeat_interleave(keys.shape[0] // batch)
        outs[0].index_add_(0, keys % module.num_embeddings, rows * per_token.unsqueeze(1))


class LayerNormRule(GradRule):
    """``nn.LayerNorm``: the affine weight's gradient is ``normalized input * grad``."""

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight", "bias"]

    def grad_samples(self, module, inputs, grads, trainable):
        x, g = inputs[0], grads[0]
        batch = x.shape[0]
        shape = tuple(module.normalized_shape)
        sum_dims = tuple(range(1, x.dim() - len(shape)))
        out = {}
        if "weight" in trainable:
            xhat = F.layer_norm(x, shape, eps=module.eps)
            out["weight"] = (xhat * g).sum(sum_dims) if sum_dims else xhat * g
        if "bias" in trainable:
            out["bias"] = g.sum(sum_dims) if sum_dims else g.clone()
        for name, value in out.items():
            out[name] = value.reshape(batch, *shape)
        return out


class GroupNormRule(GradRule):
    """``nn.GroupNorm`` on ``(batch, channels, ...)``."""

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight", "bias"]

    def grad_samples(self, module, inputs, grads, trainable):
        x, g = inputs[0], grads[0]
        sum_dims = tuple(range(2, x.dim()))
        out = {}
        if "weight" in trainable:
            xhat = F.group_norm(x, module.num_groups, eps=module.eps)
            out["weight"] = (xhat * g).sum(sum_dims) if sum_dims else xhat * g
        if "bias" in trainable:
            out["bias"] = g.sum(sum_dims) if sum_dims else g.clone()
        return out


_RULES: dict[type[nn.Module], GradRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
}


def register_grad_rule(layer_type: type[nn.Module], rule: GradRule) -> None:
    """Give layers of exactly ``layer_type`` per-sample gradients through ``rule``."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(rule, GradRule):
        raise TypeError(f"rule must be a GradRule, got {type(rule).__name__}")
    _RULES[layer_type] = rule


def rule_for(module: nn.Module, path: str) -> GradRule:
    """The rule for ``module`` (at ``path`` in its model), or a clear error naming it."""
    name = type(module).__name__
    where = f"{name} at {path!r}" if path else name
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedLayerError(
            f"{where} is not supported by DP-SGD: batch normalization mixes the examples of a "
            "batch, so no per-sample gradient exists; use nn.GroupNorm or nn.LayerNorm"
        )
    rule = _RULES.get(type(module))
    if rule is None:
        raise UnsupportedLayerError(
            f"{where} has trainable parameters but no per-sample gradient rule; supported: "
            f"{', '.join(sorted(t.__name__ for t in _RULES))} (freeze its parameters, or add a "
            "rule with veil.dp.register_grad_rule)"
        )
    rule.check(module, path)
    return rule
