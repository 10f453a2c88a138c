"""Poisson sampling of batches, the sampling that DP-SGD's accounting assumes.

Each step, every example joins the batch independently with probability ``sample_rate`` (q).
Batch sizes are therefore random (binomial, mean ``q * N``, the *expected batch size*), and a
batch can be empty; an empty batch is still a step, with noise only, and the loaders here yield
it as tensors with zero rows so the training loop runs unchanged. An epoch is
``ceil(N / expected batch size)`` steps, the length of a plain loader of that batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

from veil.dp._checks import check_count, check_sample_rate
from veil.dp._noise import NoiseSource, TorchNoise


def steps_per_epoch(num_samples: int, sample_rate: float) -> int:
    """``ceil(N / (q * N))`` steps: one pass of a plain loader with the expected batch size."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0 to define an epoch, got {sample_rate}")
    return max(1, math.ceil(1.0 / sample_rate - 1e-9)) if num_samples > 0 else 1


class PoissonSampler(Sampler[list[int]]):
    """A batch sampler: each index in each batch independently with probability ``sample_rate``.

    Args:
        num_samples: dataset size N.
        sample_rate: inclusion probability q.
        steps: batches per epoch (default :func:`steps_per_epoch`).
        noise: the randomness (default a fresh :class:`~veil.dp.TorchNoise` from OS entropy).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        noise: NoiseSource | None = None,
    ) -> None:
        self.num_samples = check_count(num_samples, "num_samples")
        self.sample_rate = check_sample_rate(sample_rate)
        self.steps = (
            steps_per_epoch(num_samples, sample_rate)
            if steps is None
            else check_count(steps, "steps", minimum=1)
        )
        self.noise = noise if noise is not None else TorchNoise()

    def sample(self) -> torch.Tensor:
        """One batch's indices, as a sorted int64 tensor (possibly empty)."""
        mask = self.noise.bernoulli(self.num_samples, self.sample_rate)
        return torch.nonzero(mask).squeeze(1)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample().tolist()

    def __len__(self) -> int:
        return self.steps


class _EmptyAwareCollate:
    """Collates a batch; an empty batch becomes the collated first example with zero rows."""

    def __init__(self, collate: Callable[[list[Any]], Any], dataset: Dataset[Any]) -> None:
        self.collate = collate
        self.dataset = dataset
        self._empty: Any = None

    def __call__(self, batch: list[Any]) -> Any:
        if batch:
            return self.collate(batch)
        if self._empty is None:
            if len(self.dataset) == 0:  # type: ignore[arg-type]
                raise ValueError("cannot make an empty batch's shapes from an empty dataset")
            self._empty = _zero_rows(self.collate([self.dataset[0]]))
        return self._empty


def _zero_rows(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:0]
    if isinstance(value, dict):
        return {k: _zero_rows(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_zero_rows(v) for v in value)
    return value


class DPDataLoader(DataLoader):
    """A ``DataLoader`` whose batches are Poisson samples of ``dataset``.

    Args:
        dataset: the data; a :class:`~torch.utils.data.TensorDataset` is indexed directly
            (one gather per tensor per batch, no per-example collation).
        sample_rate: q, so the expected batch size is ``q * len(dataset)``.
        steps: batches per epoch (default ``ceil(1 / q)``).
        noise: source of the sampling randomness.
        collate_fn, num_workers, **kwargs: as for ``DataLoader`` (no ``batch_size``, ``shuffle``,
            ``sampler`` or ``drop_last``: the sampling is fixed).

    Yields batches as the wrapped data would be collated (a list of tensors for a
    ``TensorDataset``); an empty batch has the usual structure with zero rows.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        sample_rate: float,
        steps: int | None = None,
        noise: NoiseSource | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        for banned in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if banned in kwargs:
                raise ValueError(f"DPDataLoader fixes {banned!r}: batches are Poisson samples")
        n = len(dataset)  # type: ignore[arg-type]
        sampler = PoissonSampler(n, sample_rate, steps=steps, noise=noise)
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=_EmptyAwareCollate(collate_fn or default_collate, dataset),
            num_workers=num_workers,
            **kwargs,
        )
        self.sample_rate = sampler.sample_rate
        self.expected_batch_size = sampler.sample_rate * n
        self._direct = (
            isinstance(dataset, TensorDataset) and collate_fn is None and (num_workers == 0)
        )

    @classmethod
    def from_data_loader(
        cls, loader: DataLoader, *, noise: NoiseSource | None = None
    ) -> DPDataLoader:
        """Poisson sampling with ``loader``'s batch size as the expected batch size."""
        if loader.batch_size is None:
            raise ValueError("the data loader needs a batch_size (its expected batch size)")
        n = len(loader.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("the data loader's dataset is empty")
        rate = min(1.0, loader.batch_size / n)
        return cls(
            loader.dataset,
            sample_rate=rate,
            steps=max(1, math.ceil(n / loader.batch_size)),
            noise=noise,
            collate_fn=None if loader.collate_fn is default_collate else loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not self._direct:
            yield from super().__iter__()
            return
        tensors = self.dataset.tensors  # type: ignore[attr-defined]
        sampler: PoissonSampler = self.batch_sampler  # type: ignore[assignment]
        for _ in range(len(sampler)):
            idx = sampler.sample()
            yield [t[idx] for t in tensors]
