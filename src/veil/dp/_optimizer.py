"""The DP-SGD step: clip per-sample gradients, add Gaussian noise, average, then step.

With per-sample gradients ``g_i`` of the examples in a Poisson batch ``B``, clipping norm ``C``,
noise multiplier ``sigma`` and expected batch size ``E = q * N``, the gradient handed to the
wrapped optimizer is::

    g = ( sum_{i in B} g_i * min(1, C / ||g_i||)  +  N(0, sigma^2 C^2 I) ) / E

The divisor is the *expected* batch size, a constant, not the realized ``|B|``: dividing by
``|B|`` would make the scale depend on whether one example is present, and the sensitivity of
the sum would no longer be ``C``. An empty batch gives pure noise ``N(0, sigma^2 C^2 I) / E``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from veil._errors import PrivacyBudgetExceeded
from veil.dp._accounting import PrivacyAccountant
from veil.dp._checks import check_delta, check_noise_multiplier, check_positive, check_sample_rate
from veil.dp._grad_sample import PerSampleGradients
from veil.dp._noise import NoiseSource, TorchNoise


class DPOptimizer(Optimizer):
    """Wraps ``optimizer`` so that every :meth:`step` uses the private gradient above.

    Args:
        optimizer: any ``torch.optim`` optimizer over (a subset of) ``per_sample.params``.
        per_sample: the hooks recording per-sample gradients of the model.
        noise_multiplier: sigma, noise std divided by ``max_grad_norm``.
        max_grad_norm: C, the L2 bound of each example's gradient.
        expected_batch_size: E, the divisor (``q * N`` under Poisson sampling).
        noise: source of the Gaussian noise (default :class:`~veil.dp.TorchNoise`).
        accountant: records each step (with ``sample_rate``) when given.
        sample_rate: q, for the accountant.
        max_epsilon, delta: a budget; a step that would take epsilon at ``delta`` past
            ``max_epsilon`` raises :class:`veil.PrivacyBudgetExceeded` before anything changes.

    The wrapped optimizer keeps its parameter groups and state (schedulers may change its
    learning rate through this object). ``zero_grad`` also forgets the recorded calls.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        per_sample: PerSampleGradients,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        noise: NoiseSource | None = None,
        accountant: PrivacyAccountant | None = None,
        sample_rate: float | None = None,
        max_epsilon: float | None = None,
        delta: float | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("the optimizer is already private")
        if not isinstance(per_sample, PerSampleGradients):
            raise TypeError("per_sample must be a veil.dp.PerSampleGradients")
        # Optimizer.__init__ is not called: the wrapped optimizer owns groups and state.
        self.original_optimizer = optimizer
        self.per_sample = per_sample
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = "DPOptimizer.zero_grad"
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.max_grad_norm = check_positive(max_grad_norm, "max_grad_norm")
        self.expected_batch_size = check_positive(expected_batch_size, "expected_batch_size")
        self.noise = noise if noise is not None else TorchNoise()
        self.accountant = accountant
        self.sample_rate = None if sample_rate is None else check_sample_rate(sample_rate)
        if accountant is not None and self.sample_rate is None:
            raise ValueError("an accountant needs the sample_rate of the steps")
        if max_epsilon is not None:
            if accountant is None or delta is None:
                raise ValueError("a privacy budget (max_epsilon) needs an accountant and a delta")
            max_epsilon = check_positive(max_epsilon, "max_epsilon")
        self.max_epsilon = max_epsilon
        self.delta = None if delta is None else check_delta(delta)
        self.last_norms: Tensor | None = None  # per-sample norms of the last step
        self._check_params()
        self._buffers = self._make_buffers()

    # -- parameters and buffers -----------------------------------------------------------
    def _check_params(self) -> None:
        known = {id(p) for p in self.per_sample.params}
        for group in self.original_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in known:
                    raise ValueError(
                        f"the optimizer holds a trainable parameter of shape {tuple(p.shape)} "
                        "that is not in the private module"
                    )

    def _make_buffers(self) -> tuple[list[Tensor], list[Tensor]]:
        """One flat buffer per (dtype, device); per-parameter views into them, for ``.grad``."""
        groups: dict[tuple[Any, Any], list[int]] = {}
        params = self.per_sample.params
        for i, p in enumerate(params):
            groups.setdefault((p.dtype, p.device), []).append(i)
        flats: list[Tensor] = []
        views: list[Tensor] = [torch.empty(0)] * len(params)
        for (dtype, device), members in groups.items():
            flat = torch.zeros(sum(params[i].numel() for i in members), dtype=dtype, device=device)
            offset = 0
            for i in members:
                n = params[i].numel()
                views[i] = flat[offset : offset + n].view_as(params[i])
                offset += n
            flats.append(flat)
        return flats, views

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.original_optimizer.add_param_group(param_group)
        self._check_params()

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and forget the recorded calls.

        Only the private module's parameters can hold gradients (autograd computes none for
        them while they are private), so this does not go through the wrapped optimizer.
        """
        for p in self.per_sample.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self.per_sample.clear()

    # -- the private step --------------------------------------------------------------------
    def check_budget(self) -> None:
        """Raise :class:`veil.PrivacyBudgetExceeded` if one more step would overspend."""
        if self.max_epsilon is None or self.accountant is None:
            return
        if self.delta is None or self.sample_rate is None:  # refused by __init__
            raise ValueError("a privacy budget needs a delta and a sample_rate")
        allowed = self.accountant.steps_within(
            self.max_epsilon, self.delta, self.noise_multiplier, self.sample_rate
        )
        if allowed < 1:
            spent = self.accountant.epsilon(self.delta)
            after = self.accountant.epsilon_after(
                self.delta, self.noise_multiplier, self.sample_rate, 1
            )
            raise PrivacyBudgetExceeded(
                f"the next step would bring epsilon to {after:.4f} at delta {self.delta}, over "
                f"the budget of {self.max_epsilon} (spent {spent:.4f} in "
                f"{self.accountant.steps} steps)"
            )

    def private_gradients(self) -> list[Tensor]:
        """Compute the private gradient of the recorded batch into the parameters' ``.grad``."""
        flats, views = self._buffers
        e = self.expected_batch_size
        std = self.noise_multiplier * self.max_grad_norm / e
        for flat in flats:
            if std > 0:
                self.noise.normal_(flat, std)
            else:
                flat.zero_()
        self.last_norms = self.per_sample.clipped_sum(self.max_grad_norm, views, scale=1.0 / e)
        for p, v in zip(self.per_sample.params, views):
            p.grad = v
        return views

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One DP-SGD step on the recorded batch (forward and ``loss.backward()`` first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_budget()
        self.per_sample._used()  # raises NoPerSampleGradients before noise is drawn
        self.private_gradients()
        self.per_sample.clear()
        self.original_optimizer.step()
        if self.accountant is not None:
            self.accountant.step(self.noise_multiplier, self.sample_rate)  # type: ignore[arg-type]
        return loss

    def __repr__(self) -> str:
        return (
            f"DPOptimizer({type(self.original_optimizer).__name__}, noise_multiplier="
            f"{self.noise_multiplier:g}, max_grad_norm={self.max_grad_norm:g}, "
            f"expected_batch_size={self.expected_batch_size:g})"
        )
