"""Data a worker hosts as its own: numeric CSV files given to ``veil worker --data``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class HostedData:
    """A tensor to host, with the tag and description it is found by."""

    name: str
    tensor: torch.Tensor
    description: str

    @property
    def tags(self) -> tuple[str, ...]:
        return (f"#{self.name}",)


def parse_data_arg(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` as given to ``--data``.

    Raises:
        ValueError: not ``NAME=PATH`` with a name of letters, digits, ``_``, ``-`` or ``.``.
    """
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise ValueError(f"--data takes NAME=PATH.csv, got {text!r}")
    if not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError(f"data name {name!r} may hold letters, digits, '_', '-' and '.' only")
    return name, Path(path)


def load_csv(name: str, path: str | Path) -> HostedData:
    """Read a numeric CSV file (comma or whitespace separated) as a float32 tensor.

    A first line that is not numeric is taken as the column names (kept in the description).

    Raises:
        ValueError: the file is missing, empty, ragged or not numeric.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    if "," in lines[0]:
        rows = [[c.strip() for c in row] for row in csv.reader(lines)]
    else:
        rows = [line.split() for line in lines]
    header: list[str] | None = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    if not rows:
        raise ValueError(f"{path} has no data rows")
    width = len(rows[0])
    values = []
    for number, row in enumerate(rows, 2 if header else 1):
        if len(row) != width:
            raise ValueError(f"{path}, line {number}: {len(row)} columns, expected {width}")
        try:
            values.append([float(c) for c in row])
        except ValueError:
            raise ValueError(f"{path}, line {number}: not numeric") from None
    tensor = torch.tensor(values, dtype=torch.float32)
    description = f"{path.name}: {tensor.shape[0]} rows x {tensor.shape[1]} columns"
    if header:
        description += " (" + ", ".join(header) + ")"
    return HostedData(name, tensor, description)
