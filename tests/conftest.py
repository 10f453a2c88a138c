"""Shared test configuration: datasets come from ../shared/data, never the network."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

if "VEIL_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["VEIL_DATA_DIR"] = str(SHARED_DATA)

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


import pytest  # noqa: E402
import torch  # noqa: E402

from tests.worker_kinds import KINDS  # noqa: E402


@pytest.fixture(params=sorted(KINDS))
def make_workers(request):
    """``make_workers("alice", "bob")`` gives workers of each kind in :data:`KINDS`."""
    stack = []

    def make(*names: str):
        cm = KINDS[request.param](names)
        workers = cm.__enter__()
        stack.append(cm)
        return workers if len(workers) > 1 else workers[0]

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def kind(make_workers, request):
    return request.node.callspec.params["make_workers"]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny ops on a shared 2-core machine are many times
    slower with intra-op threads (measured), and results must not depend on the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
