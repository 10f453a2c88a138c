"""Per-sample gradients of a model, captured by light forward hooks.

:class:`PerSampleGradients` adds one forward hook to every layer with trainable parameters. The
hook keeps the layer's inputs and adds a zero "probe" leaf to its output; after
``loss.backward()`` the probe's ``.grad`` is the gradient of the loss with respect to that
output, stored by autograd itself (no Python callback runs during ``backward``). From the two,
per-layer rules (:mod:`veil.dp._rules`) give per-sample gradient norms and clipped sums; for
linear and embedding layers called once per step they never build ``(batch, *param.shape)``
tensors.

While hooked, the model's trainable parameters are set to ``requires_grad=False``: autograd
then computes no parameter gradients at all (veil computes the private ones), so ``backward``
costs less than in plain training, and no non-private gradient is ever left in ``.grad``.
:meth:`PerSampleGradients.remove` restores them. Consequences: build the optimizer before
making the model private, and put regularization in the optimizer (``weight_decay``) rather
than in the loss (a loss term on parameters has no per-sample gradient and is ignored).

Hooks were chosen over ``torch.func.vmap(grad(...))`` by measurement (``benchmarks/dp.py``).
Every trainable parameter must belong to a layer with a rule; otherwise the constructor raises
:class:`veil.dp.UnsupportedLayerError` naming the layer and where it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from veil.dp import _rnn  # noqa: F401  (registers the recurrent rules)
from veil.dp._checks import NoPerSampleGradients, UnsupportedLayerError, check_positive
from veil.dp._rules import GradRule, LinearRule, rule_for

LossReduction = Literal["mean", "sum"]

_ATTR = "_veil_per_sample_gradients"


class PerSampleGradients:
    """Hooks on ``module`` that record what per-sample gradients need.

    Args:
        module: the model; every layer holding trainable parameters needs a rule.
        loss_reduction: ``"mean"`` if the loss averages over the batch (gradients are then
            multiplied back by the batch size), ``"sum"`` if it sums.

    After a forward and ``loss.backward()``, :meth:`grad_samples` gives per-sample gradients,
    :meth:`norms` their L2 norms over all trainable parameters, and :meth:`clipped_sum` the sum
    of clipped per-sample gradients. Records are kept until :meth:`clear`. Forwards run under
    ``torch.no_grad()`` (evaluation) are not recorded.
    """

    def __init__(self, module: nn.Module, *, loss_reduction: LossReduction = "mean") -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if getattr(module, _ATTR, None) is not None:
            raise ValueError("this module already has per-sample gradient hooks; remove() them")
        self.module = module
        self.loss_reduction: LossReduction = loss_reduction
        self.params: list[nn.Parameter] = []  # trainable parameters, each once
        self.names: list[str] = []
        self._slots: dict[nn.Module, list[int | None]] = {}
        self._trainable: dict[nn.Module, frozenset[str]] = {}
        self._records: list[list[Any]] = []  # [rule, layer, inputs, probes]
        self._handles: list[Any] = []
        self._shared = False  # some parameter belongs to more than one layer
        self._all_linear = True
        index: dict[int, int] = {}
        plan = []
        for path, layer in module.named_modules():
            _refuse_batch_mixing(layer, path)
            own = [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = rule_for(layer, path)
            missing = set(own) - set(rule.param_names(layer))
            if missing:
                raise UnsupportedLayerError(
                    f"{type(layer).__name__} at {path!r}: its rule gives no gradient for "
                    f"{sorted(missing)}"
                )
            slots: list[int | None] = []
            for name in rule.param_names(layer):
                p = getattr(layer, name, None)
                if not isinstance(p, nn.Parameter) or name not in own:
                    slots.append(None)
                    continue
                if id(p) in index:
                    self._shared = True
                else:
                    index[id(p)] = len(self.params)
                    self.params.append(p)
                    self.names.append(f"{path}.{name}" if path else name)
                slots.append(index[id(p)])
            plan.append((layer, rule, slots, frozenset(own)))
        if not self.params:
            raise ValueError("the module has no trainable parameters")
        for layer, rule, slots, own in plan:
            self._slots[layer] = slots
            self._trainable[layer] = own
            self._all_linear &= type(rule) is LinearRule
            self._handles.append(layer.register_forward_hook(self._make_hook(rule)))
        for p in self.params:
            p.requires_grad_(False)
        setattr(module, _ATTR, self)

    # -- recording --------------------------------------------------------------------------
    def _make_hook(self, rule: GradRule) -> Any:
        records = self._records
        probe = rule.probe

        def hook(layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            output, probes = probe(output)
            records.append([rule, layer, inputs, probes])
            return output

        return hook

    def clear(self) -> None:
        """Forget the recorded calls (the next step starts afresh)."""
        self._records.clear()

    def remove(self) -> None:
        """Remove the hooks from the module."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()
        for p in self.params:
            p.requires_grad_(True)
        if getattr(self.module, _ATTR, None) is self:
            delattr(self.module, _ATTR)

    @property
    def has_records(self) -> bool:
        """Whether a forward and backward were recorded since the last :meth:`clear`."""
        return any(any(p.grad is not None for p in rec[3]) for rec in self._records)

    def _used(self) -> list[tuple[GradRule, nn.Module, tuple[Any, ...], list[Tensor | None]]]:
        """The recorded calls that the loss reached, with their output gradients."""
        used = []
        for rule, layer, inputs, probes in self._records:
            grads = [p.grad for p in probes]
            if any(g is not None for g in grads):
                used.append((rule, layer, inputs, grads))
        if not used:
            raise NoPerSampleGradients(
                "no per-sample gradients were recorded: run the model's forward and "
                "loss.backward() before this (an empty Poisson batch still needs both)"
            )
        return used

    def batch_size(self) -> int:
        """The batch size of the recorded step."""
        rec = self._used()[0]
        return rec[0].batch_size(rec[1], rec[2])

    def _scale(self, batch: int) -> float:
        return float(batch) if self.loss_reduction == "mean" else 1.0

    # -- results ----------------------------------------------------------------------------
    @torch.no_grad()
    def grad_samples(self) -> dict[str, Tensor]:
        """Per-sample gradients ``{parameter name: (batch, *shape)}`` of the recorded step."""
        used = self._used()
        batch = used[0][0].batch_size(used[0][1], used[0][2])
        scale = self._scale(batch)
        out: dict[str, Tensor] = {}
        for rule, layer, inputs, grads in used:
            gs = rule.grad_samples(layer, inputs, grads, self._trainable[layer])
            for name, slot in zip(rule.param_names(layer), self._slots[layer]):
                if slot is None or name not in gs:
                    continue
                key = self.names[slot]
                out[key] = out[key] + gs[name] if key in out else gs[name]
        for p, name in zip(self.params, self.names):
            if name not in out:  # a parameter no recorded call used
                out[name] = p.new_zeros(batch, *p.shape)
            elif scale != 1.0:
                out[name] = out[name] * scale
        return {name: out[name] for name in self.names}

    @torch.no_grad()
    def norms(self) -> Tensor:
        """L2 norms of the per-sample gradients over all trainable parameters, ``(batch,)``."""
        used = self._used()
        sq, _, batch = self._norms_sq(used)
        return sq.sqrt_().mul_(self._scale(batch))

    def _norms_sq(self, used: list[Any]) -> tuple[Tensor, list[Any] | dict[int, Tensor], int]:
        """Squared norms of the recorded gradients; per-record caches, or summed samples."""
        layers = [rec[1] for rec in used]
        batch = used[0][0].batch_size(used[0][1], used[0][2])
        if not self._shared and len(set(map(id, layers))) == len(layers):
            total: Tensor | None = None
            caches = []
            for rule, layer, inputs, grads in used:
                sq, cache = rule.norms_sq(layer, inputs, grads, self._trainable[layer])
                caches.append(cache)
                total = sq if total is None else total.add_(sq)
            return total, caches, batch  # type: ignore[return-value]
        # A layer called more than once, or a parameter shared by layers: sum per parameter.
        gs = self._summed_samples(used)
        total = self.params[0].new_zeros(batch)
        for g in gs.values():
            total += torch.linalg.vector_norm(
                g.reshape(g.shape[0], math.prod(g.shape[1:])), dim=1
            ).square()
        return total, gs, batch

    def _summed_samples(self, used: list[Any]) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for rule, layer, inputs, grads in used:
            gs = rule.grad_samples(layer, inputs, grads, self._trainable[layer])
            for name, slot in zip(rule.param_names(layer), self._slots[layer]):
                if slot is not None and name in gs:
                    out[slot] = out[slot] + gs[name] if slot in out else gs[name]
        return out

    def _linear_norms(self, used: list[Any]) -> Tensor | None:
        """Per-sample norms when every call is a distinct linear layer on 2-D input.

        ``||g_i||^2 = sum over layers of ||a_i||^2 ||b_i||^2 (weight) + ||b_i||^2 (bias)``: two
        row norms per layer and one norm over the stacked terms, a dozen small ops in all.
        """
        if not self._all_linear or self._shared:
            return None
        parts: list[Tensor] = []
        seen: set[int] = set()
        for _, layer, inputs, grads in used:
            a, b = inputs[0], grads[0]
            if a.dim() != 2 or id(layer) in seen:
                return None
            seen.add(id(layer))
            w_slot, b_slot = self._slots[layer]
            nb = torch.linalg.vector_norm(b, dim=1)
            if w_slot is not None:
                parts.append(torch.linalg.vector_norm(a, dim=1).mul_(nb))
            if b_slot is not None:
                parts.append(nb)
        return torch.linalg.vector_norm(torch.stack(parts), dim=0)

    @torch.no_grad()
    def clipped_sum(
        self,
        max_grad_norm: float,
        outs: Sequence[Tensor],
        *,
        scale: float = 1.0,
    ) -> Tensor:
        """Add ``scale * sum_i min(1, C / ||g_i||) g_i`` into ``outs``; return the norms.

        ``outs`` holds one tensor per trainable parameter (the order of :attr:`params`), e.g.
        noise already drawn; ``g_i`` is example ``i``'s gradient over all trainable parameters
        and ``C`` is ``max_grad_norm``. Returns the per-sample norms ``||g_i||``.
        """
        c = check_positive(max_grad_norm, "max_grad_norm")
        used = self._used()
        batch = used[0][0].batch_size(used[0][1], used[0][2])
        if batch == 0:  # an empty batch adds nothing
            return self.params[0].new_zeros(0)
        s = self._scale(batch)
        caches: Any = None
        norms = self._linear_norms(used)
        if norms is None:
            sq, caches, _ = self._norms_sq(used)
            norms = sq.sqrt_()
        # The recorded gradients are g_i / s; the weight on each is
        # scale * s * min(1, C / (s * ||.||)) = scale * C / max(||.||, C / s).
        weights = torch.clamp(norms, min=c / s).reciprocal_().mul_(c * scale)
        if isinstance(caches, dict):  # summed per parameter
            for slot, g in caches.items():
                outs[slot].add_(torch.tensordot(weights, g, dims=1))
        elif caches is None:  # linear fast path
            column = weights.unsqueeze(1)
            for _, layer, inputs, grads in used:
                a, b = inputs[0], grads[0]
                w_slot, b_slot = self._slots[layer]
                if w_slot is not None:
                    outs[w_slot].addmm_((b * column).t(), a)
                if b_slot is not None:
                    outs[b_slot].addmv_(b.t(), weights)
        else:
            for (rule, layer, inputs, grads), cache in zip(used, caches):
                targets = [outs[i] if i is not None else None for i in self._slots[layer]]
                rule.accumulate(layer, inputs, grads, weights, targets, cache)
        return norms.mul_(s) if s != 1.0 else norms

    def __repr__(self) -> str:
        return f"PerSampleGradients({type(self.module).__name__}, {len(self.params)} params)"


def _refuse_batch_mixing(layer: nn.Module, path: str) -> None:
    """Layers that mix examples of a batch (or store data in buffers) cannot be private."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        rule_for(layer, path)  # raises, naming the layer and why
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm) and layer.track_running_stats:
        raise UnsupportedLayerError(
            f"{type(layer).__name__} at {path!r} tracks running statistics, which would carry "
            "the data into the model without noise; use track_running_stats=False"
        )
