"""The sensitivity sweep reproduces the thesis's Theorem 1 (Section 3.2.3, Eq. 3.18).

For one bias-free linear layer + ReLU at initialization with i.i.d. Gaussian weights (sd
sigma_w), a Gaussian update direction independent of weights and data (sd sigma_dw) and inputs
independent of both, a unit flips at trial rate eta iff 0 < c/g < eta with c = w.x, g = dw.x;
c/g is Cauchy with scale sigma_c/sigma_g = sigma_w/sigma_dw for every x, so

    D(eta) = 1 - [1 - arctan(sigma_g eta / sigma_c) / pi]^d.

Rows of one layer share its weights, so the spread of D between independent layers (not
between rows) is the sampling error; the test averages K independent layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from monitor.client.apt import log_grid
from monitor.client.handle import Monitor
from monitor.schema import AlertValue, ProbeRecord, RunStart, SiteInfo, StepSummary

D_IN, UNITS, ROWS, LAYERS = 256, 32, 256, 40
SIGMA_W = 1 / math.sqrt(D_IN)
RATIO = 0.5  # sigma_dw / sigma_w
ETAS = log_grid(4e-3, 2.0, 12)


class Probes:
    """A transport that keeps the probe records it is sent."""

    run_id = "theorem1"

    def __init__(self) -> None:
        self.records: list[ProbeRecord] = []

    def start_run(self, start: RunStart) -> str:
        return self.run_id

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        pass

    def send_summary(self, summary: StepSummary) -> None:
        pass

    def send_probe(self, probe: ProbeRecord) -> None:
        self.records.append(probe)

    def poll_alerts(self) -> list[AlertValue]:
        return []

    def finish(self, final_step: int) -> None:
        pass


class GaussianStep(torch.optim.Optimizer):
    """Moves every parameter by -lr * N(0, sigma^2), drawn from its own generator: an update
    direction independent of the weights and the data, as Theorem 1 assumes."""

    def __init__(self, params: Any, lr: float, sigma: float, generator: torch.Generator) -> None:
        super().__init__(params, {"lr": lr, "sigma": sigma})
        self.generator = generator

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                noise = torch.randn(p.shape, generator=self.generator) * group["sigma"]
                p.add_(noise, alpha=-group["lr"])


def theorem1(eta: float, units: int = UNITS, ratio: float = RATIO) -> float:
    """Eq. 3.18 with sigma_g / sigma_c = ratio."""
    return 1 - (1 - math.atan(ratio * eta) / math.pi) ** units


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def measured_d(seed: int) -> list[float]:
    """D(eta) of one fresh layer, measured by the monitor's sweep on step 0."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(D_IN, UNITS, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(UNITS, D_IN, generator=g) * SIGMA_W)
    model = nn.Sequential(layer, nn.ReLU())
    optimizer = GaussianStep(model.parameters(), lr=0.01, sigma=RATIO * SIGMA_W, generator=g)
    probes = Probes()
    with Monitor(
        model,
        optimizer,
        probes,
        every=1000,
        apt_every=None,
        sweep_every=lambda s: s == 0,
        sweep_etas=ETAS,
    ):
        model(torch.randn(ROWS, D_IN, generator=g))
        optimizer.step()
    (record,) = probes.records
    (site,) = record.sites
    assert record.kind == "sweep" and site.site == "1#0" and site.rows == ROWS
    return [c / site.rows for c in site.changed]


def test_sweep_matches_theorem1_within_sampling_error() -> None:
    per_layer = torch.tensor([measured_d(seed) for seed in range(LAYERS)], dtype=torch.float64)
    mean = per_layer.mean(dim=0)
    se = per_layer.std(dim=0) / math.sqrt(LAYERS)
    floor = 1 / (ROWS * LAYERS)  # one row over all layers: the resolution of the mean
    theory = torch.tensor([theorem1(eta) for eta in ETAS], dtype=torch.float64)
    tolerance = torch.clamp(4 * se, min=2 * floor)
    assert bool((mean - theory).abs().le(tolerance).all()), (mean, theory, tolerance)
    # The grid spans the transition, and the test can tell neighbouring models apart.
    assert mean[0] < 0.05 and mean[-1] > 0.95
    for wrong in (
        [theorem1(eta, units=UNITS - 6) for eta in ETAS],
        [theorem1(eta, ratio=RATIO * 1.25) for eta in ETAS],
    ):
        assert bool((mean - torch.tensor(wrong, dtype=torch.float64)).abs().gt(tolerance).any())
