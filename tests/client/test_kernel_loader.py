"""The compiled kernels are loaded only once the torch operations have cost as much as loading
them (``kernel_loader``): checked in a fresh process, where nothing has loaded them yet."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monitor.client.kernel_loader import LOAD_SECONDS, LOAD_SHARE, SHARE_AFTER, SHARE_WINDOW, _Rent

FRESH_PROCESS = """
import sys
import torch
from monitor.client import kernel_loader, summary

x = torch.randn(32, 64)
before = summary.to_wire("s", summary.measure(x, "dense"))
summary.measure_scale(x, "dense")
assert kernel_loader.kernels() is None
assert 0 < kernel_loader._rent.total < kernel_loader.LOAD_SECONDS, kernel_loader._rent.total
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


def paid_at(per_second: float, first: float = 0.0, seconds: float = 100.0) -> float | None:
    """When a rent of ``per_second`` (after a first charge of ``first`` at 0) has paid off,
    charged every 10 ms; None if not within ``seconds``."""
    rent = _Rent()
    if rent.add(first, 0.0):
        return 0.0
    for tick in range(1, int(seconds * 100) + 1):
        if rent.add(per_second / 100, tick / 100):
            return tick / 100
    return None


def test_a_cheap_rent_is_paid_until_it_adds_up_to_the_loading() -> None:
    # 1.8% of the time (ResNet-20's torch operations): loaded once 1 s has been spent
    paid = paid_at(0.018, first=0.15)
    assert paid == pytest.approx((LOAD_SECONDS - 0.15) / 0.018, abs=0.05)
    assert paid_at(0.018, seconds=10.0) is None  # a 10-second run never loads


def test_an_expensive_rent_is_not_paid_for_long() -> None:
    # 24% of the time (the small MLP's): loaded as soon as the share has been measured
    assert paid_at(0.24) == pytest.approx(SHARE_AFTER + SHARE_WINDOW, abs=0.02)
    # just under the share: rented on; a first step's large charge does not count in the share
    assert paid_at(0.9 * LOAD_SHARE, first=0.5, seconds=5.0) is None
