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
