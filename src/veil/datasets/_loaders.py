"""Loaders returning seeded train/test splits as float32 tensors."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import torch

from veil._errors import DatasetUnavailable
from veil.datasets._files import DATASETS, find_file


class Split(NamedTuple):
    """A train/test split: features ``x_*`` (n, d) and targets ``y_*`` (n, 1), float32."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _load_csv(name: str, data_dir: str | os.PathLike[str] | None, download: bool) -> np.ndarray:
    spec = DATASETS[name]
    path = find_file(name, data_dir, download=download)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DatasetUnavailable(f"{path} is not a numeric CSV file: {exc}") from exc
    if table.shape != (spec.rows, spec.columns):
        raise DatasetUnavailable(
            f"{path} has shape {table.shape}, expected {(spec.rows, spec.columns)}"
        )
    return table


def _split(
    table: np.ndarray, test_fraction: float, seed: int, standardize: bool
) -> Split:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n = table.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_test = math.ceil(n * test_fraction)
    test, train = table[order[:n_test]], table[order[n_test:]]
    x_train, y_train = train[:, :-1], train[:, -1:]
    x_test, y_test = test[:, :-1], test[:, -1:]
    if standardize:
        # Statistics of the training rows only, so nothing of the test set leaks into training.
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return Split(t(x_train), t(y_train), t(x_test), t(y_test))


def boston(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    download: bool = True,
) -> Split:
    """Boston Housing: 13 features, target MEDV (median home value, in $1000s).

    With the default ``test_fraction`` of 0.2, 404 rows train and 102 test (the paper's split
    sizes). ``standardize`` scales features by the training rows' mean and standard deviation;
    targets are left as they are.
    """
    return _split(_load_csv("boston", data_dir, download), test_fraction, seed, standardize)


def pima(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    download: bool = True,
) -> Split:
    """Pima Indians Diabetes: 8 features, target 0/1 (diabetes within five years).

    With the default ``test_fraction`` of 0.2, 614 rows train and 154 test.
    """
    return _split(_load_csv("pima", data_dir, download), test_fraction, seed, standardize)
