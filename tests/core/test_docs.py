"""The README's tour and the examples stay true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_tour_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python tour"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_quickstart_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert "PermissionDenied" in out.stdout
    mse = float(re.search(r"test MSE of the model brought home: ([\d.]+)", out.stdout).group(1))
    assert mse < 30
