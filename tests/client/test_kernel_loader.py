"""The compiled kernels are loaded only once the torch operations have cost as much as loading
them (``kernel_loader``): checked in a fresh process, where nothing has loaded them yet."""

from __future__ import annotations

import subprocess
import sys

FRESH_PROCESS = """
import sys
import torch
from monitor.client import kernel_loader, summary

x = torch.randn(32, 64)
before = summary.to_wire("s", summary.measure(x, "dense"))
summary.measure_scale(x, "dense")
assert kernel_loader.kernels() is None
assert 0 < kernel_loader._charged < kernel_loader.LOAD_SECONDS, kernel_loader._charged
assert "numba" not in sys.modules, "something loaded numba before the kernels paid off"
kernel_loader.charge(kernel_loader.LOAD_SECONDS)
assert kernel_loader.kernels() is not None and "numba" in sys.modules
after = summary.to_wire("s", summary.measure(x, "dense"))
assert after.model_copy(update={"sumsq": 0.0}) == before.model_copy(update={"sumsq": 0.0})
print("loaded")
"""


def test_kernels_load_once_the_torch_operations_have_cost_their_loading() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "loaded"
