"""DP tests run torch on one thread: tiny ops on a shared 2-core machine are many times slower
with intra-op threads (measured), and results must not depend on the thread count."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
