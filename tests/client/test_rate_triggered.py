"""The default APT schedule ``RateTriggered`` against its definition, alone and under watch()."""

from __future__ import annotations

import pytest
import torch
from memory_transport import ListTransport
from torch import nn

from monitor.client.apt import RateTriggered
from monitor.client.handle import Monitor


def reference(rates: list[float], every: int, rise: float) -> list[int]:
    """Brute force: step s is probed when s - last probe >= every, or the rate of step s - 1
    exceeds (1 + rise) x the rate of the last probe (the first probe: step 0)."""
    probed: list[int] = []
    for s in range(len(rates)):
        if not probed:
            probed.append(s)
            continue
        last = probed[-1]
        if s - last >= every or rates[s - 1] > (1 + rise) * rates[last]:
            probed.append(s)
    return probed


def drive(rates: list[float], schedule: RateTriggered) -> list[int]:
    """The order the client asks in: the step's answer, its rate, then the probe if due."""
    chosen = []
    for step, rate in enumerate(rates):
        due = schedule(step)
        assert schedule(step) == due  # fixed once asked
        schedule.observe(step, rate)
        assert schedule(step) == due  # a rate seen later does not change it
        if due:
            chosen.append(step)
            schedule.probed(step, rate)
    return chosen


@pytest.mark.parametrize(
    "rates",
    [
        [0.1] * 120,  # constant: the baseline cadence only
        [0.1] * 30 + [0.1 * 1.05 ** (s - 30) for s in range(30, 120)],  # a 5% per step ramp
        [0.1] * 40 + [1.0] * 80,  # a jump
        [0.1 * (1 + s) / 40 for s in range(40)] + [0.1 * 0.99**s for s in range(80)],  # warm-up
    ],
)
def test_probes_where_the_rate_rose_and_at_the_baseline_cadence(rates: list[float]) -> None:
    assert drive(rates, RateTriggered(every=25, rise=0.2)) == reference(rates, 25, 0.2)


def test_cadence_and_ramp_in_numbers() -> None:
    assert drive([0.1] * 80, RateTriggered(every=25, rise=0.2)) == [0, 25, 50, 75]
    ramp = [0.1] * 30 + [0.1 * 1.05 ** (s - 30) for s in range(30, 60)]
    # 1.05^3 = 1.158 <= 1.2 < 1.05^4 = 1.216, judged on the previous step's rate: step 35 (rate
    # of step 34 = 1.05^4 x that of 25), then every fifth step
    assert drive(ramp, RateTriggered(every=25, rise=0.2)) == [0, 25, 35, 40, 45, 50, 55]
    with pytest.raises(ValueError):
        RateTriggered(every=0)
    with pytest.raises(ValueError):
        RateTriggered(rise=0.0)


def own_rate_reference(rates: list[float], every: int, rise: float) -> list[int]:
    """Brute force with each step's own rate known as its forward starts: step s is probed when
    s - last probe >= every or the rate of step s exceeds (1 + rise) x that of the last probe."""
    probed: list[int] = []
    for s, rate in enumerate(rates):
        if not probed or s - probed[-1] >= every or rate > (1 + rise) * rates[probed[-1]]:
            probed.append(s)
    return probed


def test_a_step_asked_before_its_rate_was_set_is_probed_when_its_forward_sees_the_rise() -> None:
    rates = [0.1] * 40 + [1.0] * 10 + [0.1 * 1.05**s for s in range(60)]
    schedule = RateTriggered(every=25, rise=0.2)
    chosen = []
    for step, rate in enumerate(rates):
        schedule(step)  # asked at the end of the step before, on the old rate
        schedule.reconsider(step, rate)  # the forward starts with the step's own rate
        due = schedule(step)
        schedule.observe(step, rate)
        assert schedule(step) == due  # fixed from the forward on
        if due:
            chosen.append(step)
            schedule.probed(step, rate)
    assert chosen == own_rate_reference(rates, 25, 0.2)
    assert chosen[:3] == [0, 25, 40]  # the jump's own step, not the one after it
    # A "yes" stays a "yes": a rate that fell back does not cancel a probe already decided.
    cadence = RateTriggered(every=25, rise=0.2)
    assert cadence(0)
    cadence.reconsider(0, 0.01)
    assert cadence(0)


def train_at(rates: list[float], **options: object) -> ListTransport:
    """A small model trained under ``Monitor`` with each step's rate set at the loop's top."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    transport = ListTransport()
    with Monitor(model, optimizer, transport, **options) as monitor:  # type: ignore[arg-type]
        if not options:
            assert isinstance(monitor.prober.apt if monitor.prober else None, RateTriggered)
        for rate in rates:
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad()
            model(torch.randn(16, 4)).square().mean().backward()
            optimizer.step()
    return transport


def test_watch_probes_by_default_when_the_rate_rises() -> None:
    rates = [0.01] * 40 + [0.1] * 30
    transport = train_at(rates)
    probes = transport.probes_of("apt")
    # the rate is set at the top of the loop: the jump's own step is probed
    assert [p.step for p in probes] == own_rate_reference(rates, 25, 0.1) == [0, 25, 40, 65]
    assert [p.lr for p in probes] == [rates[p.step] for p in probes]
    assert not transport.probes_of("sweep")
    # A step without a summary (every=10) is not armed before its forward: its rise is seen
    # one step late, as the schedule alone decides (step 41's rate, probed at 42).
    late = [0.01] * 41 + [0.1] * 29
    sparse = train_at(late, every=10)
    assert [p.step for p in sparse.probes_of("apt")] == reference(late, 25, 0.1) == [0, 25, 42, 67]
    assert not train_at([0.01] * 5, apt_every=None).probes


def test_default_probe_of_a_model_without_buffers_matches_brute_force() -> None:
    """The direct-call path (no buffers to swap in): changed rows by hand, per site."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    transport = ListTransport()
    expected = {}
    with Monitor(model, optimizer, transport, every=1000) as monitor:
        assert monitor.prober is not None and not list(model.buffers())
        for step in range(30):
            x = torch.randn(20, 5)
            before = [m(x) for m in _prefixes(model)]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), torch.randint(0, 3, (20,))).backward()
            optimizer.step()
            after = [m(x) for m in _prefixes(model)]
            expected[step] = [
                int(((b > 0) != (a > 0)).any(dim=1).sum())
                for b, a in zip(before, after, strict=True)
            ]
    probes = transport.probes_of("apt")
    assert [p.step for p in probes] == [0, 25]
    for probe in probes:
        assert [s.changed[0] for s in probe.sites] == expected[probe.step]
        assert all(s.rows == 20 for s in probe.sites)


def _prefixes(model: nn.Sequential) -> list[nn.Module]:
    """The preactivations of the two ReLU sites: the layers before each ReLU, without autograd
    (so that the monitor does not take them for training forwards)."""

    def without_grad(part: nn.Module) -> nn.Module:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return part(x)

        return run  # type: ignore[return-value]

    return [without_grad(model[:1]), without_grad(model[:3])]
