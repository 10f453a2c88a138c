"""Locating, downloading and verifying the dataset files."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from veil._errors import DatasetUnavailable

_SOURCE = "https://raw.githubusercontent.com/jbrownlee/Datasets/master/"


@dataclass(frozen=True)
class DatasetFile:
    """One canonical CSV file: its name, expected sha256 and public download address."""

    filename: str
    sha256: str
    url: str
    rows: int
    columns: int


DATASETS: dict[str, DatasetFile] = {
    "boston": DatasetFile(
        "housing.csv",
        "2682ca02e83b89467d7d0cdcbde7c0cc4d2566119be8ce8d84dad4f0fa20859a",
        _SOURCE + "housing.csv",
        506,
        14,
    ),
    "pima": DatasetFile(
        "pima-indians-diabetes.csv",
        "6bfe5d0f379d17a0e0819b996407e3c09bf80febd4287f2ed212190dfff154af",
        _SOURCE + "pima-indians-diabetes.csv",
        768,
        9,
    ),
}


def cache_dir() -> Path:
    """veil's cache directory: ``$XDG_CACHE_HOME/veil``, else ``~/.cache/veil``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "veil"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(spec: DatasetFile, target: Path, timeout: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download next to the target, verify, then rename: a failed or corrupt download
    # never leaves a half-written file in the cache.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=timeout) as r:  # noqa: S310 (fixed https URL)
            out.write(r.read())
        digest = _sha256(Path(tmp))
        if digest != spec.sha256:
            raise DatasetUnavailable(
                f"downloaded {spec.filename} from {spec.url} but its sha256 is {digest}, "
                f"expected {spec.sha256}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_file(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Return the path of dataset ``name`` ("boston" or "pima"), verified by sha256.

    Looks in ``data_dir``, then ``$VEIL_DATA_DIR``, then the cache directory; if none holds a
    file with the right hash and ``download`` is true, downloads it into the cache.

    Raises:
        DatasetUnavailable: the name is unknown, or no verified file could be found or fetched.
    """
    if name not in DATASETS:
        raise DatasetUnavailable(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir) / spec.filename)
    if os.environ.get("VEIL_DATA_DIR"):
        candidates.append(Path(os.environ["VEIL_DATA_DIR"]) / spec.filename)
    cached = cache_dir() / spec.filename
    candidates.append(cached)
    wrong_hash: list[str] = []
    for path in candidates:
        if path.is_file():
            if _sha256(path) == spec.sha256:
                return path
            wrong_hash.append(str(path))
    problems = [f"{p} has the wrong sha256" for p in wrong_hash]
    if download:
        try:
            _download(spec, cached, timeout)
            return cached
        except (OSError, DatasetUnavailable) as exc:
            problems.append(f"download from {spec.url} failed: {exc}")
    looked = ", ".join(str(p) for p in candidates)
    raise DatasetUnavailable(
        f"dataset {name!r} ({spec.filename}) is not available: looked in {looked}"
        + (f"; {'; '.join(problems)}" if problems else "")
        + f". Put {spec.filename} (sha256 {spec.sha256}) in a directory and pass it as "
        "data_dir, or set VEIL_DATA_DIR to that directory."
    )
