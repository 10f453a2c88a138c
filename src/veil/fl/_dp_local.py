"""DP-SGD where the data lives: each worker trains the model on its own rows, privately.

:func:`dp_sgd_mlp` is a remote function: called with pointers to a worker's data it runs on
that worker as one command, and only the trained parameters and the privacy spent leave it.
:func:`private_fedavg` runs it on every worker of a federated dataset, round after round, and
averages the models (FedAvg over DP-SGD clients).

Privacy: the workers hold disjoint rows, so every example is only ever touched by its own
worker's DP-SGD steps, and the averages the orchestrator computes are post-processing. The
example-level guarantee of the whole run is therefore the worst worker's: the composition of
all its Poisson-sampled Gaussian steps over every round (accounted with the same
``dp-accounting`` machinery as :mod:`veil.dp`). The noise multiplier is calibrated once, for
the total number of steps, before training starts.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from veil.dp import PrivacyEngine, calibrate_noise_multiplier, compute_epsilon
from veil.fl._data import FederatedDataset
from veil.fl._local import LOSSES
from veil.pointers import remote_function

Accountant = Literal["rdp", "pld"]

#: The losses DP-SGD on a worker supports (a subset of what workers know).
_LOSSES: dict[str, Callable[..., Tensor]] = {k: LOSSES[k] for k in ("mse", "bce_with_logits")}

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """``Linear(widths[0], widths[1]), ReLU, ..., Linear(widths[-2], widths[-1])``."""
    if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be two or more positive ints, got {list(widths)!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _dp_meta(x: Tensor, y: Tensor, params: Tensor, *args: Any, **kwargs: Any
             ) -> tuple[Tensor, Tensor]:
    return (torch.empty(params.shape, dtype=params.dtype, device="meta"),
            torch.empty(2, dtype=torch.float64, device="meta"))


@remote_function("fl.dp_sgd_mlp", meta=_dp_meta)
def dp_sgd_mlp(x: Tensor, y: Tensor, params: Tensor, widths: Sequence[int], epochs: int,
               batch_size: int, lr_hidden: float, lr_output: float, max_grad_norm: float,
               noise_multiplier: float, delta: float, loss: str = "mse", ema: float = 0.0,
               seed: int | None = None, optimizer: str = "sgd", target_center: float = 0.0,
               target_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """DP-SGD on ``(x, y)`` for an MLP of ``widths`` starting from the flat ``params``.

    Poisson batches of expected size ``batch_size``, per-example clipping to
    ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm`` (see
    :class:`veil.dp.PrivacyEngine`); ``optimizer`` ``"sgd"`` or ``"adam"`` (DP-Adam: the same
    private gradient fed to Adam, whose per-parameter steps adapt to the noise level) with
    ``lr_output`` on the last layer and ``lr_hidden`` on the others. With ``ema > 0`` the
    returned parameters are the exponential moving average of the iterates (decay ``ema``),
    post-processing that costs no privacy.

    ``target_center`` and ``target_scale`` describe a *public* range of the targets (for MSE):
    the model is trained to fit ``(y - target_center) / target_scale`` (its last layer is
    rescaled on entry and scaled back on return, so ``params`` in and out are those of the
    model that predicts ``y`` itself). Clipped, noisy steps are small, so targets of order 20
    are out of reach from an output near 0 without it. The map must not come from the data
    (it would cost privacy): take it from the targets' documented range.

    Returns:
        The trained flat parameters, and a float64 tensor ``[epsilon at delta, steps]`` of
        this call alone. Nothing else about the data leaves the function.
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if loss != "mse" and (target_center, target_scale) != (0.0, 1.0):
        raise ValueError(f"a target range (target_center, target_scale) is for loss 'mse', "
                         f"not {loss!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    if not (math.isfinite(target_center) and math.isfinite(target_scale)
            and target_scale > 0):
        raise ValueError("target_center must be finite and target_scale finite and positive, "
                         f"got {target_center} and {target_scale}")
    model = mlp(list(widths))
    n_params = sum(p.numel() for p in model.parameters())
    if params.dim() != 1 or params.numel() != n_params:
        raise ValueError(f"an MLP of widths {list(widths)} has {n_params} parameters, "
                         f"got a tensor of shape {tuple(params.shape)}")
    torch.nn.utils.vector_to_parameters(params.detach().float().clone(), model.parameters())
    layers = [m for m in model if isinstance(m, nn.Linear)]
    last = layers[-1]
    with torch.no_grad():  # the model now predicts (y - center) / scale
        last.weight.div_(target_scale)
        last.bias.sub_(target_center).div_(target_scale)
    hidden = [p for layer in layers[:-1] for p in layer.parameters()]
    groups = [{"params": list(last.parameters()), "lr": lr_output}]
    if hidden:
        groups.append({"params": hidden, "lr": lr_hidden})
    engine = PrivacyEngine(seed=seed)
    model, private_optimizer, loader = engine.make_private(
        module=model, optimizer=_OPTIMIZERS[optimizer](groups, lr=lr_output),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    loss_fn = _LOSSES[loss]
    average = [p.detach().clone() for p in model.parameters()]
    try:
        for _ in range(epochs):
            for xb, yb in loader:
                private_optimizer.zero_grad()
                loss_fn(model(xb), (yb - target_center) / target_scale).backward()
                private_optimizer.step()
                if ema > 0:
                    with torch.no_grad():
                        for a, p in zip(average, model.parameters()):
                            a.lerp_(p, 1.0 - ema)
    finally:
        engine.detach()
    out = average if ema > 0 else [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # back to the model that predicts y (weight, bias of the last layer)
        out[-2].mul_(target_scale)
        out[-1].mul_(target_scale).add_(target_center)
    spent = torch.tensor([engine.get_epsilon(delta), float(engine.steps)], dtype=torch.float64)
    return torch.nn.utils.parameters_to_vector(out).to(params.dtype), spent


@dataclass
class PrivateFedAvgResult:
    """What :func:`private_fedavg` did.

    Attributes:
        epsilon: example-level epsilon spent at ``delta`` (the worst worker's).
        delta: its delta.
        noise_multiplier: sigma used by every worker.
        steps: DP-SGD steps taken by each worker (by name), over all rounds.
        round_seconds: wall time of each round.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    steps: dict[str, int] = field(default_factory=dict)
    round_seconds: list[float] = field(default_factory=list)


def private_fedavg(model: nn.Sequential, dataset: FederatedDataset, *, rounds: int,
                   local_epochs: int, batch_size: int, lr_hidden: float, lr_output: float,
                   max_grad_norm: float, delta: float, target_epsilon: float | None = None,
                   noise_multiplier: float | None = None, loss: str = "mse",
                   ema: float = 0.0, accountant: Accountant = "rdp", optimizer: str = "sgd",
                   target_center: float = 0.0, target_scale: float = 1.0,
                   seed: int | None = None,
                   on_round: Callable[[int, nn.Module], None] | None = None
                   ) -> PrivateFedAvgResult:
    """FedAvg whose clients run DP-SGD on their own workers (:func:`dp_sgd_mlp`).

    Each round sends the global parameters to every worker, which trains ``local_epochs``
    epochs of DP-SGD on its rows in one remote call; the new global model is the average of
    the workers' models weighted by their row counts. ``model`` must be an MLP as built by
    :func:`mlp` (Linear layers with ReLU between them); it is updated in place.

    Give ``target_epsilon`` (sigma is calibrated so that each worker's whole run spends at
    most that, at ``delta``) or ``noise_multiplier``. ``optimizer``, ``target_center`` and
    ``target_scale`` are passed to :func:`dp_sgd_mlp` (a fresh optimizer every round).
    ``seed`` makes the noise and the batches reproducible (each call gets its own seed derived
    from it, the round and the worker); ``None`` seeds every call from the OS.
    """
    widths = _widths(model)
    if rounds < 1 or local_epochs < 1 or batch_size < 1:
        raise ValueError("rounds, local_epochs and batch_size must be positive")
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    sizes = {p.worker.name: len(p) for p in dataset.parts}
    # (sampling rate, total steps) of each worker
    plan = {name: (min(1.0, batch_size / n), rounds * local_epochs * math.ceil(n / batch_size))
            for name, n in sizes.items()}
    if noise_multiplier is None:
        # The worker with the most steps at the highest rate needs the most noise.
        sigma = max(calibrate_noise_multiplier(target_epsilon, delta, q, t, accountant)
                    for q, t in plan.values())
    else:
        sigma = float(noise_multiplier)
    result = PrivateFedAvgResult(0.0, delta, sigma, dict.fromkeys(sizes, 0))
    total = sum(sizes.values())
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        calls = [(part, dp_sgd_mlp(part.data, part.targets, flat, widths, local_epochs,
                                   batch_size, lr_hidden, lr_output, max_grad_norm, sigma,
                                   delta, loss, ema, _call_seed(seed, rnd, k, len(sizes)),
                                   optimizer, target_center, target_scale))
                 for k, part in enumerate(dataset.parts)]
        new = torch.zeros_like(flat, dtype=torch.float64)
        for part, (params, spent) in calls:
            new += params.get().double() * (len(part) / total)
            result.steps[part.worker.name] += int(spent.get()[1].item())
        torch.nn.utils.vector_to_parameters(new.to(flat.dtype), model.parameters())
        result.round_seconds.append(time.perf_counter() - t0)
        if on_round is not None:
            on_round(rnd, model)
    result.epsilon = max(
        compute_epsilon(sigma, plan[name][0], steps, delta, accountant) if steps else 0.0
        for name, steps in result.steps.items())
    return result


def _call_seed(seed: int | None, rnd: int, worker: int, workers: int) -> int | None:
    """A distinct seed for each (round, worker) call, or None to seed from the OS."""
    return None if seed is None else seed * 1_000_003 + rnd * workers + worker


def _widths(model: nn.Module) -> list[int]:
    """The widths of an MLP as :func:`mlp` builds it; TypeError for any other module."""
    layers = list(model) if isinstance(model, nn.Sequential) else []
    ok = len(layers) % 2 == 1 and all(
        type(m) is (nn.Linear if k % 2 == 0 else nn.ReLU) for k, m in enumerate(layers))
    linears = layers[::2]
    ok = ok and all(m.bias is not None for m in linears) and all(
        a.out_features == b.in_features for a, b in itertools.pairwise(linears))
    if not ok:
        raise TypeError("private_fedavg() trains an nn.Sequential of Linear layers (with "
                        "biases) and ReLUs between them, as veil.fl.mlp() builds")
    return [linears[0].in_features, *(m.out_features for m in linears)]
