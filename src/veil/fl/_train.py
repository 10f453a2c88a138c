"""Federated training loops: the paper's loop and FedAvg rounds."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from veil._errors import ProtocolError, VeilError
from veil.fl import _local
from veil.fl._checkpoint import load_checkpoint, save_checkpoint
from veil.fl._data import FederatedDataLoader, FederatedDataset, WorkerData
from veil.fl._strategy import ClientUpdate, FedAvg, Strategy
from veil.workers import VirtualWorker

LossFn = Callable[[Any, Any], Any]


class NotEnoughWorkers(VeilError):
    """Fewer workers than the configured minimum finished a round."""


def train_sequential(model: nn.Module, loader: FederatedDataLoader, *, epochs: int = 10,
                     lr: float = 0.001, loss_fn: LossFn = F.mse_loss,
                     progress: bool = False) -> nn.Module:
    """The paper's loop: the model travels to each worker's data in turn and trains there.

    For every epoch and worker: send the model, run SGD over that worker's batches, bring it
    home. With the same batch order this is exactly centralized SGD, without pooling data.
    """
    _check_positive(epochs=epochs, lr=lr)
    bar = tqdm(total=epochs * len(loader), disable=not progress, desc="federated SGD",
               unit="batch")
    for _ in range(epochs):
        for part in loader.dataset.parts:
            model.send(part.worker)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            for xb, yb in loader.batches(part):
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
                bar.update()
            model.get()
    bar.close()
    return model


@dataclass
class RoundReport:
    """What happened in one round."""

    round: int
    seconds: float
    workers: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


@dataclass
class FedHistory:
    """The rounds of a federated training run."""

    rounds: list[RoundReport] = field(default_factory=list)

    def to_state(self) -> list[dict[str, Any]]:
        return [{"round": r.round, "seconds": r.seconds, "workers": r.workers,
                 "dropped": r.dropped} for r in self.rounds]

    @classmethod
    def from_state(cls, state: list[dict[str, Any]]) -> FedHistory:
        return cls([RoundReport(r["round"], r["seconds"], list(r["workers"]),
                                dict(r["dropped"])) for r in state])


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{name} must be positive, got {v!r}")


def _client_round(global_model: nn.Module, part: WorkerData, loader: FederatedDataLoader,
                  local_epochs: int, lr: float, momentum: float, prox_mu: float,
                  loss_fn: LossFn, fused: bool, orders: torch.Tensor | None) -> ClientUpdate:
    """Train a copy of the global model on one worker; leave its flat update there.

    ``orders``: the row order of each local epoch (None: rows in order), drawn beforehand
    so that concurrent workers do not race for the shuffling generator.
    """
    local = copy.deepcopy(global_model).send(part.worker)
    if fused and _local.can_train_remotely(local, loss_fn, part.data, part.targets):
        update = _local.train_remotely(local, part.data, part.targets, orders, local_epochs,
                                       loader.batch_size, lr, momentum, prox_mu,
                                       _local.loss_name(loss_fn))
        part.worker.flush()  # a worker that failed or left is dropped here, not mid-aggregation
        return ClientUpdate(part.worker, len(part), update)
    params = list(local.parameters())
    with torch.no_grad():
        start = [p.copy() for p in params]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    for epoch in range(local_epochs):
        for xb, yb in loader.batches(part, None if orders is None else orders[epoch]):
            opt.zero_grad()
            loss = loss_fn(local(xb), yb)
            if prox_mu > 0:  # FedProx: keep the local model near the round's start
                prox = sum(((p - s) ** 2).sum() for p, s in zip(params, start))
                loss = loss + prox * (prox_mu / 2)
            loss.backward()
            opt.step()
    with torch.no_grad():
        update = torch.cat([(p - s).reshape(-1) for p, s in zip(params, start)])
    part.worker.flush()  # a worker that failed or left is dropped here, not mid-aggregation
    return ClientUpdate(part.worker, len(part), update)


def fedavg(model: nn.Module, dataset: FederatedDataset, *, rounds: int = 10,
           local_epochs: int = 1, lr: float = 0.001, batch_size: int = 8,
           momentum: float = 0.0, prox_mu: float = 0.0, loss_fn: LossFn = F.mse_loss,
           strategy: Strategy | None = None, min_workers: int = 1, shuffle: bool = False,
           seed: int | None = 0, checkpoint: str | os.PathLike[str] | None = None,
           parallel: bool | None = None, progress: bool = False,
           on_round: Callable[[RoundReport, nn.Module], None] | None = None,
           fused: bool = True) -> FedHistory:
    """Federated averaging: each round, every worker trains a copy of ``model`` on its own
    data and the strategy combines the updates (weighted by sample counts) into ``model``.

    Args:
        model: the global model (local; trained in place).
        dataset: where the data lives.
        rounds, local_epochs, lr, batch_size, momentum: the usual SGD settings.
        prox_mu: FedProx's proximal weight (0 is plain FedAvg).
        strategy: how updates are combined (default :class:`FedAvg`;
            :class:`SecureFedAvg` hides individual updates).
        min_workers: a round in which fewer workers finish raises :class:`NotEnoughWorkers`;
            workers that fail (e.g. :class:`veil.WorkerUnavailable`) are reported in the
            round's ``dropped`` and the round completes with the others.
        checkpoint: a file to save the state to after each round; if it exists when training
            starts, training resumes from it (model, round, history and shuffling state).
        parallel: train workers concurrently in threads (default: when any worker is not
            in-process).
        progress: show a progress bar.
        on_round: called after each round with its report and the model.
        fused: when the model is made of allow-listed layers and ``loss_fn`` is a torch
            loss that workers know (``veil.fl.LOSSES``), each worker runs its round's SGD
            as one command (:func:`veil.fl.local_sgd`): the same operations, so the same
            result, without a message per batch. ``False`` drives every batch through
            pointers.
    """
    _check_positive(rounds=rounds, local_epochs=local_epochs, lr=lr)
    if prox_mu < 0 or momentum < 0:
        raise ValueError("prox_mu and momentum must be non-negative")
    if not 1 <= min_workers <= len(dataset.parts):
        raise ValueError(f"min_workers must be in [1, {len(dataset.parts)}], got {min_workers}")
    if getattr(model, "_veil_remote", None) is not None:
        raise ProtocolError("fedavg() needs the global model at home; .get() it first")
    strategy = strategy or FedAvg()
    loader = FederatedDataLoader(dataset, batch_size, shuffle=shuffle, seed=seed)
    history = FedHistory()
    first = 1
    if checkpoint is not None and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        history = FedHistory.from_state(state["history"])
        loader._gen.set_state(state["generator"])
        strategy.load_state(state.get("strategy", {}))
        first = int(state["round"]) + 1
    if parallel is None:
        parallel = any(not isinstance(p.worker, VirtualWorker) for p in dataset.parts)
    params = list(model.parameters())
    bar = tqdm(total=rounds, initial=first - 1, disable=not progress, desc=strategy.name,
               unit="round")
    pool = ThreadPoolExecutor(len(dataset.parts)) if parallel else None
    try:
        for rnd in range(first, rounds + 1):
            t0 = time.perf_counter()

            orders = {id(p): loader.epoch_orders(p, local_epochs) for p in dataset.parts}

            def run(part: WorkerData, orders: dict[int, Any] = orders) -> ClientUpdate:
                return _client_round(model, part, loader, local_epochs, lr, momentum,
                                     prox_mu, loss_fn, fused, orders[id(part)])

            updates: list[ClientUpdate] = []
            dropped: dict[str, str] = {}
            futures = [(p, pool.submit(run, p)) if pool else (p, None)
                       for p in dataset.parts]
            for part, fut in futures:
                try:
                    updates.append(fut.result() if fut is not None else run(part))
                except (VeilError, ConnectionError, OSError, TimeoutError) as exc:
                    dropped[part.worker.name] = f"{type(exc).__name__}: {exc}"
            if len(updates) < min_workers:
                raise NotEnoughWorkers(
                    f"round {rnd}: {len(updates)} of {len(dataset.parts)} workers finished, "
                    f"at least {min_workers} needed; dropped: {dropped}")
            avg = strategy.aggregate(updates)
            with torch.no_grad():
                offset = 0
                for p in params:
                    n = p.numel()
                    p.add_(avg[offset:offset + n].reshape(p.shape).to(p.dtype))
                    offset += n
            report = RoundReport(rnd, time.perf_counter() - t0,
                                 [u.worker.name for u in updates], dropped)
            history.rounds.append(report)
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "round": rnd, "model": dict(model.state_dict()),
                    "history": history.to_state(), "generator": loader._gen.get_state(),
                    "strategy": strategy.state()})
            if on_round is not None:
                on_round(report, model)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True)
    return history

