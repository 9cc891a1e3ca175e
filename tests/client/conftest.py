"""Client tests run with the compiled CPU kernels loaded, so that each test takes the same path
whatever ran before it (a process's first summaries use torch operations until
``kernel_loader`` loads the kernels; ``test_summary_merge`` compares the two paths)."""

from __future__ import annotations

import pytest

from monitor.client.kernel_loader import load_kernels


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_loaded() -> None:
    assert load_kernels() is not None, "the CPU kernels did not load"
