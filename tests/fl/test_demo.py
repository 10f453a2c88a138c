"""`veil demo --quick` runs in one command and reproduces the paper's table."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_veil_demo_quick(tmp_path):
    out = tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "demo", "--quick", "--no-progress", "--out",
         str(out)], capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    for method in ("plain PyTorch", "FL, virtual workers", "FedAvg + secure aggregation"):
        assert table.count(method) == 2, table  # one row per dataset
    boston = [float(m) for m in re.findall(r"Boston Housing .*?test MSE ([\d.]+)", table)]
    assert boston and all(v < 40 for v in boston)
    assert out.stat().st_size > 1000


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "veil.cli", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "veil.cli", "nonsense"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr
