"""DP tests run torch on one thread (see the ``one_thread`` fixture in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
