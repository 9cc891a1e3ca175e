"""When ``kernel_loader`` loads the compiled kernels: once the seconds they would have saved add up
to their loading's cost, and not because training waited for its host. Checked in fresh processes,
where nothing has loaded them yet."""

from __future__ import annotations

import subprocess
import sys

FRESH_PROCESS = """
import logging, sys, time
import torch
from monitor.client import kernel_loader, summary

logging.basicConfig(level=logging.INFO, format="%(message)s")

x = torch.randn(32, 64)
before = summary.to_wire("s", summary.measure(x, "dense"))
counted = kernel_loader._charged
assert 0 < counted < kernel_loader.LOAD_SECONDS, counted
began = time.perf_counter()
summary.measure_scale(x, "dense")
spent = time.perf_counter() - began
scale_rent = kernel_loader._charged - counted
assert 0 < scale_rent <= kernel_loader.SCALE_SAVING * spent, (scale_rent, spent)
summary.measure_scale(torch.full((4, 3), float("nan")), "dense")
assert kernel_loader._charged == counted + scale_rent, "a non-finite site paid rent"
assert kernel_loader.kernels() is None
assert "numba" not in sys.modules, "something loaded numba before the kernels paid off"
kernel_loader.charge(kernel_loader.LOAD_SECONDS, 1.0)
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
    while mon.transport.waited_seconds < 0.5 and time.perf_counter() - began < 60:
        step()
    waited = mon.transport.waited_seconds
    mon.close()
assert waited >= 0.5, f"training waited only {waited:.2f} s for its host in 60 s"
assert kernel_loader._charged < kernel_loader.LOAD_SECONDS, kernel_loader._charged
assert kernel_loader.kernels() is None and "numba" not in sys.modules, "loaded for the waits"
print("not loaded")
"""


def run_fresh(code: str, last_line: str) -> str:
    """Run ``code`` in a fresh interpreter; its standard error (the log)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == last_line
    return done.stderr


def test_kernels_load_once_their_rent_adds_up_to_their_loading() -> None:
    log = run_fresh(FRESH_PROCESS, "loaded")
    assert "apmon loads its compiled CPU kernels: they would have saved" in log, log[-2000:]


def test_waiting_for_the_host_does_not_load_the_kernels() -> None:
    # A small model runs hundreds of steps before the embedded host has started; once it has,
    # the host is far behind and training waits for it. An earlier rule loaded the kernels in
    # those waits: about 100 MiB more for the job, and no faster run (``kernel_loader``).
    run_fresh(WHILE_THE_HOST_CATCHES_UP, "not loaded")
