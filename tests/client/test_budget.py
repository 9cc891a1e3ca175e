"""Scale-only statistics (``measure_scale``) and the capture budget that chooses them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monitor.client.budget import MAX_STRIDE, CaptureBudget
from monitor.client.handle import Monitor
from monitor.client.summary import measure, measure_scale, to_wire
from monitor.schema import SiteSummary
from tests.client.memory_transport import ListTransport


def naive_scale(rows: list[list[float]]) -> tuple[int, list[int], int, float, float]:
    """Rows, per-unit on-counts, non-finite rows, sum of squares and max |x| of finite values."""
    units = len(rows[0])
    on = [sum(1 for r in rows if r[u] > 0) for u in range(units)]
    nonfinite = sum(1 for r in rows if any(not math.isfinite(v) for v in r))
    finite = [v for r in rows for v in r if math.isfinite(v)]
    return len(rows), on, nonfinite, sum(v * v for v in finite), max(map(abs, finite))


def as_rows(x: torch.Tensor, kind: str) -> list[list[float]]:
    """The rows the capture sees: conv positions (N*H*W, C), sequence positions (N*T, d)."""
    if kind == "conv":
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1, x.shape[-1]).tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("shape", "kind"), [((9, 13), "dense"), ((3, 4, 5), "seq"), ((2, 3, 4, 5), "conv")]
)
def test_scale_statistics_match_brute_force_and_the_full_measure(
    shape: tuple[int, ...], kind: str, dtype: torch.dtype
) -> None:
    """float32/float64 go through the compiled kernels, float16 through torch operations."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    x.reshape(-1)[5] = float("nan")
    x.reshape(-1)[17] = float("inf")
    stats = measure_scale(x, kind)  # type: ignore[arg-type]
    rows, on, nonfinite, sumsq, max_abs = naive_scale(as_rows(x, kind))
    assert (stats.rows, stats.unit_on.tolist(), stats.nonfinite_rows) == (rows, on, nonfinite)
    assert stats.sumsq == pytest.approx(sumsq, rel=1e-6)  # float32 squares summed in float32
    assert stats.max_abs == max_abs
    full = measure(x, kind)  # type: ignore[arg-type]
    assert (full.rows, full.unit_on.tolist(), full.nonfinite_rows) == (rows, on, nonfinite)
    assert (full.sumsq, full.max_abs) == pytest.approx((stats.sumsq, stats.max_abs), rel=1e-6)


def test_scale_only_summary_is_valid_on_the_wire_and_merges_as_scale_only() -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    merged = measure(x, "dense").merge(measure_scale(x, "dense"))
    assert merged.scale_only and merged.rows == 12
    assert merged.unit_on.tolist() == [2 * c for c in measure(x, "dense").unit_on.tolist()]
    wire = to_wire("fc#0", merged)
    checked = SiteSummary.model_validate(wire.model_dump())
    assert checked.scale_only and checked.distinct == 0 and checked.spectrum == []
    assert checked.rows == 12
    with pytest.raises(ValueError, match="scale_only"):
        SiteSummary(site="s", rows=2, distinct=1, spectrum=[(2, 1)], scale_only=True)


def feed(budget: CaptureBudget, steps: int, full: float, scale: float, plain: float) -> None:
    for step in range(steps):
        is_full = budget.full(step)
        own = full if is_full else scale
        budget.note(is_full, own, plain + own)


def test_the_stride_is_the_smallest_power_of_two_within_the_budget() -> None:
    budget = CaptureBudget(0.05)
    feed(budget, 200, full=0.2e-3, scale=0.02e-3, plain=2e-3)
    # allowed 0.1 ms a step: k=2 gives (0.2 + 0.02) / 2 = 0.11 ms, k=4 gives 0.065 ms
    assert budget.stride == 4
    assert budget.full_steps > 0 and budget.scale_steps > budget.full_steps
    cheap = CaptureBudget(0.05)
    feed(cheap, 200, full=0.05e-3, scale=0.01e-3, plain=2e-3)
    assert cheap.stride == 1
    early = CaptureBudget(0.05)  # the first estimate comes after one step of each kind
    feed(early, 2, full=0.05e-3, scale=0.01e-3, plain=2e-3)
    assert early.stride == 1
    hopeless = CaptureBudget(0.05)
    feed(hopeless, 400, full=1e-3, scale=0.2e-3, plain=1e-3)
    assert hopeless.stride == MAX_STRIDE
    off = CaptureBudget(None)
    feed(off, 200, full=1e-3, scale=0.2e-3, plain=1e-3)
    assert off.stride == 1
    with pytest.raises(ValueError):
        CaptureBudget(0.0)


def train(monitor_options: dict[str, object], steps: int) -> ListTransport:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    transport = ListTransport()
    mon = Monitor(model, opt, transport, **monitor_options)  # type: ignore[arg-type]
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))

    @mon
    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(steps):
        step()
    mon.close()
    return transport


def test_a_tiny_budget_counts_patterns_on_some_steps_and_scale_on_every_step() -> None:
    thin = train({"capture_budget": 1e-6}, 80)
    assert [s.step for s in thin.summaries] == list(range(80))
    kinds = [all(site.scale_only for site in s.sites) for s in thin.summaries]
    # patterns until a step that counted them was timed (step 0 is not: it has no start),
    # then the stride starts at 64 and the tiny budget keeps it there
    assert kinds == [i > 1 and i % 64 != 0 for i in range(80)]
    for summary in thin.summaries:
        (site,) = summary.sites
        assert site.rows == 32 and len(site.unit_on) == 16 and site.sumsq
        assert summary.loss is not None
    every = train({"capture_budget": None}, 40)
    assert not any(site.scale_only for s in every.summaries for site in s.sites)
