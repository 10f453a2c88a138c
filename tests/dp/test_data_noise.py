"""Poisson sampling, empty batches and the noise sources."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from veil.dp import DPDataLoader, PoissonSampler, SecureNoise, TorchNoise


def test_poisson_batch_sizes_are_binomial():
    sampler = PoissonSampler(1000, 0.05, steps=400, noise=TorchNoise(seed=0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert len(sampler) == 400
    assert sizes.mean().item() == pytest.approx(50, rel=0.05)
    assert sizes.var().item() == pytest.approx(1000 * 0.05 * 0.95, rel=0.2)


def test_each_index_is_included_at_rate_q():
    sampler = PoissonSampler(20, 0.3, steps=2000, noise=TorchNoise(seed=1))
    counts = torch.zeros(20)
    for batch in sampler:
        counts[batch] += 1
    assert torch.allclose(counts / 2000, torch.full((20,), 0.3), atol=0.04)


def test_steps_per_epoch_default():
    assert len(PoissonSampler(404, 32 / 404)) == 13
    assert len(PoissonSampler(100, 0.01)) == 100
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(10, 1.5)


def test_tensor_dataset_batches_and_empty_batches():
    ds = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    loader = DPDataLoader(ds, sample_rate=0.05, steps=60, noise=TorchNoise(seed=2))
    batches = list(loader)
    assert len(batches) == 60
    empties = [b for b in batches if len(b[0]) == 0]
    assert empties, "q = 0.05 on 10 examples gives empty batches"
    x, y = empties[0]
    assert x.shape == (0, 1) and x.dtype == torch.float32 and y.shape == (0,)
    full = next(b for b in batches if len(b[0]))
    assert torch.equal(full[0].squeeze(1).long(), full[1])  # rows stay aligned


class _Dicts(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"x": torch.full((2,), float(i)), "label": i}


def test_generic_dataset_empty_batch_keeps_structure():
    loader = DPDataLoader(_Dicts(), sample_rate=0.02, steps=30, noise=TorchNoise(seed=0))
    batches = list(loader)
    empty = next(b for b in batches if len(b["x"]) == 0)
    assert empty["x"].shape == (0, 2) and empty["label"].shape == (0,)
    nonempty = next(b for b in batches if len(b["x"]))
    assert torch.equal(nonempty["x"][:, 0].long(), nonempty["label"])


def test_from_data_loader_and_refusals():
    ds = TensorDataset(torch.randn(50, 3))
    dp = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=10))
    assert dp.sample_rate == pytest.approx(0.2) and len(dp) == 5
    assert dp.expected_batch_size == pytest.approx(10)
    with pytest.raises(ValueError, match="batch_size"):
        DPDataLoader(ds, sample_rate=0.1, batch_size=4)


def test_torch_noise_is_reproducible():
    a, b = TorchNoise(seed=7), TorchNoise(seed=7)
    assert torch.equal(a.normal_(torch.empty(5), 1.0), b.normal_(torch.empty(5), 1.0))
    assert torch.equal(a.bernoulli(10, 0.5), b.bernoulli(10, 0.5))


def test_secure_noise_statistics():
    noise = SecureNoise()
    z = noise.normal_(torch.empty(20001, dtype=torch.float64), 2.0)
    assert z.mean().abs() < 0.05
    assert z.std().item() == pytest.approx(2.0, rel=0.03)
    # kurtosis of a Gaussian is 3
    assert ((z / z.std()) ** 4).mean().item() == pytest.approx(3.0, abs=0.15)
    assert not torch.equal(
        SecureNoise().normal_(torch.empty(4), 1.0), SecureNoise().normal_(torch.empty(4), 1.0)
    )
    mask = noise.bernoulli(20000, 0.25)
    assert mask.dtype == torch.bool and mask.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert not noise.bernoulli(100, 0.0).any() and noise.bernoulli(100, 1.0).all()
    assert noise.normal(3).shape == (3,)
