"""examples/dp_boston.py stays runnable: its quick mode end to end (table and plot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dp_boston_quick(tmp_path):
    out = tmp_path / "dp_boston.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dp_boston.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("| 0.5 |") for line in lines)
    assert any(line.startswith("| no DP |") for line in lines)
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dp_boston", ROOT / "examples" / "dp_boston.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dp_boston", module)  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_dp_boston_linear_init_is_exact():
    import torch

    ex = _load_example()
    model = ex.make_model(3)
    w = torch.randn(14)
    ex.linear_init(model, w)
    x = torch.randn(50, 13)
    torch.testing.assert_close(model(x).squeeze(1), x @ w[:13] + w[13], rtol=1e-5, atol=1e-5)


def test_dp_boston_two_stages_spend_exactly_the_calibrated_epsilon():
    """Both stages count: the second engine continues the first one's accountant."""
    import dataclasses

    import veil
    import veil.dp

    ex = _load_example()
    hp = dataclasses.replace(ex.HYPER, linear_epochs=1, epochs=1, accountant="rdp")
    split = veil.datasets.boston()
    n = len(split.x_train)
    steps = ex.steps_of(n, hp)
    assert steps == 2 * 7
    sigma = veil.dp.calibrate_noise_multiplier(1.0, hp.delta, hp.batch_size / n, steps, "rdp")
    mse, spent = ex.train_dp(split, 1.0, sigma, seed=0, hp=hp)
    assert 1.0 - 1e-3 <= spent <= 1.0
    assert 0.0 < mse < (ex.HIGH - ex.LOW) ** 2  # predictions clamped to the public range
