"""Shared test fixtures."""
from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture
def one_thread():
    """One thread for torch, BLAS and OpenMP: on small arrays, 2 threads on a shared 2-core runner
    oversubscribe and run 10-70x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)
