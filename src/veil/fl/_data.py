"""Federated data: datasets split across workers, and a loader of pointer batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from veil._errors import WorkerMismatch
from veil.pointers import PointerTensor
from veil.workers import Worker


@dataclass
class WorkerData:
    """One worker's share of a federated dataset: pointers to its features and targets."""

    worker: Worker
    data: PointerTensor
    targets: PointerTensor

    def __len__(self) -> int:
        return int(self.data.shape[0])


class FederatedDataset:
    """Data that lives on several workers, one :class:`WorkerData` each.

    Build it by splitting local data (:meth:`split`, the simulation convenience: the
    caller owns the data and sends each part away) or from data that owners host themselves
    (:meth:`from_pointers` or :meth:`search`), which the caller never sees.
    """

    def __init__(self, parts: Sequence[WorkerData]):
        if not parts:
            raise ValueError("a federated dataset needs at least one worker's data")
        seen = set()
        for part in parts:
            if part.data.location is not part.worker or part.targets.location is not part.worker:
                raise WorkerMismatch(
                    f"data for {part.worker.name} does not live on {part.worker.name}")
            if part.data.shape[0] != part.targets.shape[0]:
                raise ValueError(
                    f"{part.worker.name} has {part.data.shape[0]} rows of data but "
                    f"{part.targets.shape[0]} targets")
            if id(part.worker) in seen:
                raise ValueError(f"worker {part.worker.name} appears twice")
            seen.add(id(part.worker))
        self.parts = list(parts)

    @property
    def workers(self) -> list[Worker]:
        return [p.worker for p in self.parts]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __repr__(self) -> str:
        inner = ", ".join(f"{p.worker.name}: {len(p)}" for p in self.parts)
        return f"FederatedDataset({inner})"

    @classmethod
    def split(cls, data: torch.Tensor, targets: torch.Tensor,
              workers: Sequence[Worker]) -> FederatedDataset:
        """Split rows evenly (in order) across ``workers`` and send each part to its worker."""
        if len(workers) == 0:
            raise ValueError("federate() needs at least one worker")
        if data.shape[0] != targets.shape[0]:
            raise ValueError(f"{data.shape[0]} rows of data but {targets.shape[0]} targets")
        if data.shape[0] < len(workers):
            raise ValueError(f"{data.shape[0]} rows cannot be split across {len(workers)} workers")
        chunks = torch.tensor_split(torch.arange(data.shape[0]), len(workers))
        parts = [WorkerData(w, data[idx].send(w), targets[idx].send(w))
                 for w, idx in zip(workers, chunks)]
        return cls(parts)

    @classmethod
    def from_pointers(cls, pairs: dict[Worker, tuple[PointerTensor, PointerTensor]]
                      ) -> FederatedDataset:
        """Use data the workers already hold: ``{worker: (data_ptr, targets_ptr)}``."""
        return cls([WorkerData(w, d, t) for w, (d, t) in pairs.items()])

    @classmethod
    def search(cls, workers: Sequence[Worker], data_tag: str, target_tag: str
               ) -> FederatedDataset:
        """Find each worker's hosted data by tags (one object per tag on every worker)."""
        parts = []
        for w in workers:
            found = []
            for tag in (data_tag, target_tag):
                hits = w.search(tag)
                if len(hits) != 1:
                    raise ValueError(f"{w.name} holds {len(hits)} objects tagged {tag!r}, not 1")
                found.append(hits[0])
            parts.append(WorkerData(w, found[0], found[1]))
        return cls(parts)


def federate(data: torch.Tensor, targets: torch.Tensor,
             workers: Sequence[Worker]) -> FederatedDataset:
    """Split ``(data, targets)`` across ``workers`` (see :meth:`FederatedDataset.split`)."""
    return FederatedDataset.split(data, targets, workers)


class FederatedDataLoader:
    """Yields ``(data, targets)`` pointer batches, worker by worker.

    Args:
        dataset: the federated dataset.
        batch_size: rows per batch (the last batch of a worker may be smaller).
        shuffle: shuffle each worker's rows every epoch (indices are drawn locally and
            travel with the command; the data does not move).
        seed: seed of the shuffling generator (None: unseeded).
    """

    def __init__(self, dataset: FederatedDataset, batch_size: int = 8, *,
                 shuffle: bool = False, seed: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._cache: dict[int, list[tuple[PointerTensor, PointerTensor]]] = {}
        self._gen = torch.Generator()
        if seed is not None:
            self._gen.manual_seed(seed)
        else:
            self._gen.seed()

    def __len__(self) -> int:
        return sum(-(-len(p) // self.batch_size) for p in self.dataset.parts)

    def batches(self, part: WorkerData, order: torch.Tensor | None = None
                ) -> Iterator[tuple[PointerTensor, PointerTensor]]:
        """The batches of one worker's data, for one epoch (in ``order`` if given, a row of
        :meth:`epoch_orders`; else shuffled as configured)."""
        n, b = len(part), self.batch_size
        if order is None and self.shuffle:
            order = torch.randperm(n, generator=self._gen)
        if order is not None:
            for idx in order.split(b):
                yield part.data[idx], part.targets[idx]
        else:  # the same slices every epoch: make them once (views on the worker)
            key = id(part)
            if key not in self._cache:
                self._cache[key] = [(part.data[i:i + b], part.targets[i:i + b])
                                    for i in range(0, n, b)]
            yield from self._cache[key]

    def epoch_orders(self, part: WorkerData, epochs: int) -> torch.Tensor | None:
        """The row orders of ``epochs`` epochs of one worker (None: rows in order), drawn
        as :meth:`batches` would draw them, for training that runs on the worker."""
        if not self.shuffle:
            return None
        return torch.stack([torch.randperm(len(part), generator=self._gen)
                            for _ in range(epochs)])

    def __iter__(self) -> Iterator[tuple[PointerTensor, PointerTensor]]:
        for part in self.dataset.parts:
            yield from self.batches(part)
