from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import veil
from veil.datasets import DATASETS, find_file


def test_boston_split_sizes_and_seed():
    a = veil.datasets.boston()
    b = veil.datasets.boston()
    assert a.x_train.shape == (404, 13) and a.y_train.shape == (404, 1)
    assert a.x_test.shape == (102, 13) and a.y_test.shape == (102, 1)
    assert a.x_train.dtype == torch.float32
    assert torch.equal(a.x_train, b.x_train)
    c = veil.datasets.boston(seed=1)
    assert not torch.equal(a.y_train, c.y_train)
    # Standardized on the training rows.
    assert torch.allclose(a.x_train.mean(0), torch.zeros(13), atol=1e-5)
    total = torch.cat([a.y_train, a.y_test]).double().mean().item()
    assert total == pytest.approx(22.5328, abs=1e-4)


def test_pima_split():
    s = veil.datasets.pima(standardize=False)
    assert s.x_train.shape == (614, 8) and s.x_test.shape == (154, 8)
    assert int(torch.cat([s.y_train, s.y_test]).sum()) == 268


def test_explicit_dir_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("VEIL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "housing.csv"
    shutil.copy(src, tmp_path / "housing.csv")
    assert find_file("boston", tmp_path, download=False) == tmp_path / "housing.csv"


def test_missing_file_says_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.delenv("VEIL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(veil.DatasetUnavailable, match="VEIL_DATA_DIR"):
        veil.datasets.boston(tmp_path, download=False)


def test_corrupt_file_is_rejected(tmp_path, monkeypatch):
    monkeypatch.delenv("VEIL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "housing.csv").write_text("1,2,3\n")
    with pytest.raises(veil.DatasetUnavailable, match="wrong sha256"):
        find_file("boston", tmp_path, download=False)


def test_hashes_match_shared_data():
    for spec in DATASETS.values():
        path = Path(os.environ["VEIL_DATA_DIR"]) / spec.filename
        assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        veil.datasets.boston(test_fraction=1.5)
