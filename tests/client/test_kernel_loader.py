"""When ``kernel_loader`` loads the compiled kernels: once the seconds they would have saved add up
to their price (their loading's cost and their memory's), and not because training waited for its
host; never or at once where the user's ``compiled_kernels`` setting says so. Checked in fresh
processes, where nothing has loaded them yet."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from monitor.client import kernel_loader
from monitor.settings import Settings

FRESH_PROCESS = """
import logging, sys, time
import torch
from monitor.client import kernel_loader, summary

logging.basicConfig(level=logging.INFO, format="%(message)s")

x = torch.randn(32, 64)
before = summary.to_wire("s", summary.measure(x, "dense"))
counted = kernel_loader._charged
assert 0 < counted < kernel_loader.LOAD_SECONDS < kernel_loader.BUY_SECONDS, counted
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
assert kernel_loader.kernels() is None, "the loading's second bought the memory too"
kernel_loader.charge(kernel_loader.MEMORY_PRICE_SECONDS, 1.0)
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
assert kernel_loader._charged < kernel_loader.BUY_SECONDS, kernel_loader._charged
assert kernel_loader.kernels() is None and "numba" not in sys.modules, "loaded for the waits"
print("not loaded")
"""


# A job that set APMON_COMPILED_KERNELS=never: rent well past the loading's cost buys nothing
# (FRESH_PROCESS checks that numpy and torch give the kernels' statistics), and close() logs it.
NEVER_BY_ENVIRONMENT = """
import logging, sys, tempfile
import torch
from torch import nn
import monitor
from monitor.client import kernel_loader
from monitor.settings import Settings

logging.basicConfig(level=logging.INFO, format="%(message)s")
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
with tempfile.TemporaryDirectory() as folder:
    settings = Settings(database_url=f"sqlite:///{folder}/apmon.db", mlflow_tracking_uri="")
    assert settings.compiled_kernels == "never"
    with monitor.watch(model, opt, settings=settings) as mon:
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        kernel_loader.charge(3 * kernel_loader.LOAD_SECONDS, 1.0)
        assert mon.step == 5, mon.step
assert kernel_loader.would_have_saved() >= 3 * kernel_loader.LOAD_SECONDS
assert kernel_loader.kernels() is None and "numba" not in sys.modules, "loaded under never"
print("never loaded")
"""


ALWAYS = """
import sys, tempfile
import torch
from torch import nn
import monitor
from monitor.client import kernel_loader
from monitor.settings import Settings

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
with tempfile.TemporaryDirectory() as folder:
    database = f"sqlite:///{folder}/apmon.db"
    settings = Settings(database_url=database, mlflow_tracking_uri="", compiled_kernels="always")
    assert "numba" not in sys.modules
    mon = monitor.watch(model, opt, settings=settings)
    loaded = kernel_loader.kernels() is not None and "numba" in sys.modules
    mon.close()
assert loaded, "watch() did not load the kernels under always"
print("loaded in watch")
"""


def run_fresh(code: str, last_line: str, environment: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter (with ``environment`` added); its standard error."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(environment or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == last_line
    return done.stderr


def test_kernels_load_once_their_rent_adds_up_to_their_loading_and_memory() -> None:
    log = run_fresh(FRESH_PROCESS, "loaded")
    assert "apmon loads its compiled CPU kernels: they would have saved" in log, log[-2000:]


def test_waiting_for_the_host_does_not_load_the_kernels() -> None:
    # A small model runs hundreds of steps before the embedded host has started; once it has,
    # the host is far behind and training waits for it. An earlier rule loaded the kernels in
    # those waits: about 100 MiB more for the job, and no faster run (``kernel_loader``).
    run_fresh(WHILE_THE_HOST_CATCHES_UP, "not loaded")


def test_never_keeps_numba_out_of_the_job() -> None:
    log = run_fresh(NEVER_BY_ENVIRONMENT, "never loaded", {"APMON_COMPILED_KERNELS": "never"})
    assert "kernels would have saved this process about 3.0 s" in log, log[-2000:]


def test_always_loads_the_kernels_in_watch() -> None:
    run_fresh(ALWAYS, "loaded in watch")


def test_an_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, always, never"):
        kernel_loader.set_policy("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="'auto', 'always' or 'never'"):
        Settings(compiled_kernels="sometimes")  # type: ignore[arg-type]
