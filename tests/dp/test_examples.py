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


def test_dp_boston_composed_calibration_meets_target():
    import dataclasses
    import math

    ex = _load_example()
    hp = dataclasses.replace(ex.HYPER, accountant="rdp", linear_share=0.3)
    rate, steps = 64 / 404, 700
    sigma_linear, sigma = ex.calibrate(1.0, rate, steps, hp)
    assert sigma_linear is not None and math.isfinite(sigma)
    total = ex.total_epsilon(sigma_linear, sigma, rate, steps, hp.delta, "rdp")
    assert 1.0 - 1e-3 <= total <= 1.0
