"""When ``kernel_loader`` loads the compiled kernels: once the torch operations have cost as much
as loading them, or once training has waited for its host. Checked in fresh processes, where nothing
has loaded them yet."""

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


WHILE_THE_HOST_CATCHES_UP = """
import sys, tempfile, time
import torch
from torch import nn
import monitor
from monitor.client import kernel_loader
from monitor.settings import Settings

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
with tempfile.TemporaryDirectory() as folder:
    settings = Settings(database_url=f"sqlite:///{folder}/apmon.db", mlflow_tracking_uri="")
    mon = monitor.watch(model, opt, settings=settings)

    @mon
    def step():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    began = time.perf_counter()
    while kernel_loader.kernels() is None and time.perf_counter() - began < 60:
        step()
    waited = mon.transport.waited_seconds
    mon.close()
assert kernel_loader.kernels() is not None, "not loaded within 60 s"
assert waited >= kernel_loader.WAITED_SECONDS, waited
assert kernel_loader._charged < kernel_loader.LOAD_SECONDS, "loaded as rent, not for the waits"
print("loaded")
"""


def run_fresh(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded"


def test_kernels_load_once_the_torch_operations_have_cost_their_loading() -> None:
    run_fresh(FRESH_PROCESS)


def test_kernels_load_once_training_has_waited_for_its_host() -> None:
    # A small model runs hundreds of steps before the embedded host has started; once it has,
    # the host is far behind and training waits for it: the kernels load after those waits.
    run_fresh(WHILE_THE_HOST_CATCHES_UP)
