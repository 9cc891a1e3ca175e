"""Input statistics (``input/rms``, ``input/max_abs``): against plain Python on small tensors,
and on the summaries of a monitored run (capture rows, micro-batches, unscheduled steps)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor.client.handle import Monitor
from monitor.client.input_stats import MAX_ABS, RMS, InputStats, as_scalars, first_floating
from tests.client.memory_transport import ListTransport


def naive(batches: list[torch.Tensor], rows: int | None) -> dict[str, float]:
    """RMS and max |x| over the first ``rows`` rows of each batch, one number at a time."""
    values: list[float] = []
    for x in batches:
        kept = x if rows is None or x.dim() < 2 else x[:rows]
        values += [float(v) for v in kept.reshape(-1).tolist()]
    return {
        RMS: math.sqrt(sum(v * v for v in values) / len(values)),
        MAX_ABS: max(abs(v) for v in values),
    }


@pytest.mark.parametrize(
    ("shapes", "rows"),
    [
        ([(5, 3)], None),
        ([(5, 3)], 2),
        ([(7, 2, 3, 3)], 4),
        ([(3, 4), (6, 4)], 4),  # two micro-batches of one step: sums add, the maximum is kept
        ([(2, 2, 5)], 10),  # fewer rows than the limit
        ([(6,)], 2),  # a 1-d input has no rows to cut: every value counts
    ],
)
def test_the_statistics_match_plain_python(shapes: list[tuple[int, ...]], rows: int | None) -> None:
    g = torch.Generator().manual_seed(len(shapes) * 10 + (rows or 0))
    batches = [3 * torch.randn(shape, generator=g) - 1 for shape in shapes]
    stats = InputStats()
    for x in batches:
        stats.add((x,), {}, rows)
    got = as_scalars(stats.take())
    want = naive(batches, rows)
    assert got == pytest.approx(want, rel=1e-6)
    assert stats.take() == (0, 0.0, 0.0)  # taken: the next step starts empty


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(6, 5, generator=g).t(),  # not contiguous
        lambda g: torch.randn(5, 6, generator=g, dtype=torch.float64),
        lambda g: torch.randn(5, 6, generator=g).to(torch.bfloat16),  # summed in float32
    ],
)
def test_every_path_matches_plain_python(make) -> None:
    x = make(torch.Generator().manual_seed(3)) * 2 - 0.5
    stats = InputStats()
    stats.add((x,), {}, 3)
    assert as_scalars(stats.take()) == pytest.approx(naive([x.double()], 3), rel=1e-6)


def test_the_first_floating_argument_is_measured_and_integers_are_skipped() -> None:
    tokens = torch.arange(6).reshape(2, 3)
    x = torch.tensor([[3.0, -4.0]])
    assert first_floating((tokens, x), {}) is x
    assert first_floating((tokens,), {"mask": None, "inputs": x}) is x
    assert first_floating((tokens, "text"), {}) is None
    stats = InputStats()
    stats.add((tokens,), {}, None)
    assert as_scalars(stats.take()) == {}
    stats.add((tokens,), {"inputs": x}, None)
    assert as_scalars(stats.take()) == pytest.approx({RMS: math.sqrt(12.5), MAX_ABS: 4.0})


def test_half_precision_sums_in_float32_and_non_finite_inputs_send_nothing() -> None:
    x = torch.full((4, 1000), 200.0, dtype=torch.float16)  # sum of squares 1.6e8 > float16's max
    stats = InputStats()
    stats.add((x,), {}, None)
    assert as_scalars(stats.take()) == pytest.approx({RMS: 200.0, MAX_ABS: 200.0})
    stats.add((torch.tensor([[1.0, float("inf")]]),), {}, None)
    assert as_scalars(stats.take()) == {}  # both are inf: neither is sent
    stats.add((torch.tensor([[1.0, 2.0]]),), {}, None)
    stats.add((torch.tensor([[float("nan"), 2.0]]),), {}, None)  # a second micro-batch
    assert as_scalars(stats.take()) == {}
    stats.add((torch.zeros(0, 3),), {}, None)
    assert as_scalars(stats.take()) == {}


def test_a_monitored_run_ships_them_on_each_captured_summary() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    transport = ListTransport()
    monitor = Monitor(net, optimizer, transport, every=2, capture_rows=3)
    batches: list[list[torch.Tensor]] = []
    for step in range(4):
        micro = [torch.randn(4, 5) * (step + 1), torch.randn(2, 5) - step]
        batches.append(micro)
        for x in micro:  # two micro-batches, then one optimizer step
            F.cross_entropy(net(x), torch.zeros(len(x), dtype=torch.long)).backward()
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()
    train = [s for s in transport.summaries if s.source == "train" and s.sites]
    assert [s.step for s in train] == [0, 2]  # every=2: steps 1 and 3 measure nothing
    for summary in train:
        scalars = summary.scalars or {}
        want = naive(batches[summary.step], 3)
        assert {k: scalars[k] for k in want} == pytest.approx(want, rel=1e-6)
        assert "lr/group0" in scalars
