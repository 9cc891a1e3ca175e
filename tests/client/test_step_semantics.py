"""Step semantics for every way people train: closures, accumulation, submodules, wrappers.

Every APT D and unit count is checked against a brute-force oracle that recomputes the
patterns with plain tensor code from the parameters before and after each step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor.client.handle import AlertRaised, Monitor, unwrap_optimizer
from monitor.schema import AlertValue, StepSummary
from tests.client.memory_transport import ListTransport

BATCH = 12


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def oracle_masks(net: nn.Sequential, x: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """Preactivation > 0 at both ReLU sites, from the weights, without the monitor's code."""
    with torch.no_grad():
        h1 = x @ net[0].weight.T + net[0].bias
        h2 = h1.clamp(min=0) @ net[2].weight.T + net[2].bias
    return {f"{prefix}1#0": h1 > 0, f"{prefix}3#0": h2 > 0}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, int]:
    return {site: int((before[site] != after[site]).any(dim=1).sum()) for site in before}


def apt_counts(transport: ListTransport) -> list[dict[str, int]]:
    return [{s.site: s.changed[0] for s in p.sites} for p in transport.probes_of("apt")]


def train_summaries(transport: ListTransport) -> list[StepSummary]:
    return [s for s in transport.summaries if s.source == "train" and s.sites]


def unit_on(summary: StepSummary) -> dict[str, list[int]]:
    return {s.site: list(s.unit_on) for s in summary.sites}


@pytest.mark.parametrize(
    ("factory", "min_forwards"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), 1),
        (lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4), 2),
    ],
    ids=["sgd", "lbfgs"],
)
def test_forward_inside_optimizer_step_closure_is_probed(
    factory: Callable[..., torch.optim.Optimizer], min_forwards: int
) -> None:
    torch.manual_seed(0)
    net = mlp()
    optimizer = factory(net.parameters())
    transport = ListTransport()
    monitor = Monitor(net, optimizer, transport, every=1, apt_every=1)
    expected, expected_on, forwards = [], [], []
    for step in range(4):
        x, y = data(step)
        before = oracle_masks(net, x)
        calls = []

        def closure(
            x: torch.Tensor = x, y: torch.Tensor = y, calls: list[int] = calls
        ) -> torch.Tensor:
            calls.append(1)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        forwards.append(len(calls))
        expected.append(changed(before, oracle_masks(net, x)))
        expected_on.append({site: mask.sum(0).tolist() for site, mask in before.items()})
    monitor.close()
    assert min(forwards) >= min_forwards  # LBFGS evaluated the closure more than once
    assert apt_counts(transport) == expected
    assert sum(sum(c.values()) for c in expected) > 0
    summaries = train_summaries(transport)
    assert [s.step for s in summaries] == [0, 1, 2, 3]
    # One summary per step, of the first evaluation of the closure (at theta_t) only.
    assert [unit_on(s) for s in summaries] == expected_on
    assert all(site.rows == BATCH for s in summaries for site in s.sites)


def test_accumulation_with_the_decorator_on_the_micro_batch_function() -> None:
    torch.manual_seed(1)
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    transport = ListTransport()
    monitor = Monitor(net, optimizer, transport, every=1, apt_every=1)

    @monitor
    def micro_batch(x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        loss = F.cross_entropy(net(x), y)
        (loss / 4).backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()
        return loss

    losses, expected, expected_on = [], [], []
    for step in range(3):
        batches = [data(4 * step + i) for i in range(4)]
        before = [oracle_masks(net, x) for x, _ in batches]
        values = [float(micro_batch(x, y, i == 3).detach()) for i, (x, y) in enumerate(batches)]
        losses.append(sum(values) / 4)
        # The probed micro-batch is the step's last.
        expected.append(changed(before[-1], oracle_masks(net, batches[-1][0])))
        expected_on.append(
            {site: sum(b[site].sum(0) for b in before).tolist() for site in before[0]}
        )
    monitor.close()
    summaries = train_summaries(transport)
    assert [s.step for s in summaries] == [0, 1, 2]
    assert [s.loss for s in summaries] == pytest.approx(losses, rel=1e-6)
    assert [unit_on(s) for s in summaries] == expected_on  # every micro-batch, once
    assert apt_counts(transport) == expected


def test_accumulation_with_the_decorator_on_the_step_function() -> None:
    torch.manual_seed(2)
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    transport = ListTransport()
    monitor = Monitor(net, optimizer, transport, every=1)

    @monitor
    def train_step(step: int) -> float:
        total = 0.0
        for i in range(3):
            x, y = data(3 * step + i)
            loss = F.cross_entropy(net(x), y)
            (loss / 3).backward()
            total += float(loss) / 3
        optimizer.step()
        optimizer.zero_grad()
        return total

    losses = [train_step(step) for step in range(3)]
    monitor.close()
    assert [s.loss for s in train_summaries(transport)] == pytest.approx(losses, rel=1e-6)


class Outer(nn.Module):
    """A LightningModule-like holder whose own forward is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()


def test_a_submodules_forward_is_captured_and_probed() -> None:
    torch.manual_seed(3)
    outer = Outer()
    optimizer = torch.optim.SGD(outer.parameters(), lr=0.5)
    transport = ListTransport()
    monitor = Monitor(outer, optimizer, transport, every=1, apt_every=1, sweep_every=2)
    expected, expected_on = [], []
    for step in range(3):
        x, y = data(step)
        before = oracle_masks(outer.net, x, "net.")
        optimizer.zero_grad()
        F.cross_entropy(outer.net(x), y).backward()
        optimizer.step()
        expected.append(changed(before, oracle_masks(outer.net, x, "net.")))
        expected_on.append({site: mask.sum(0).tolist() for site, mask in before.items()})
    monitor.close()
    assert apt_counts(transport) == expected
    assert [unit_on(s) for s in train_summaries(transport)] == expected_on
    assert [p.step for p in transport.probes_of("sweep")] == [0, 2]


class Wrapper:
    """An optimizer wrapper in the way of accelerate's and Lightning's: ``.optimizer`` inside."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()


def test_optimizer_wrappers_are_unwrapped() -> None:
    net = mlp()
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    assert unwrap_optimizer(Wrapper(Wrapper(inner))) is inner
    assert unwrap_optimizer(inner) is inner
    transport = ListTransport()
    monitor = Monitor(net, Wrapper(inner), transport, every=1)
    for step in range(2):
        x, y = data(step)
        F.cross_entropy(net(x), y).backward()
        Wrapper(inner).step()
    monitor.close()
    assert monitor.optimizer is inner
    assert [s.step for s in train_summaries(transport)] == [0, 1]


def test_what_cannot_be_captured_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    watched, other = mlp(), mlp()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    monitor = Monitor(watched, optimizer, ListTransport(), every=1, apt_every=1)
    with caplog.at_level(logging.WARNING, logger="monitor"):
        for step in range(3):
            x, y = data(step)
            F.cross_entropy(other(x), y).backward()
            optimizer.step()
    monitor.close()
    text = [r.getMessage() for r in caplog.records]
    assert sum("no forward of the watched model" in t for t in text) == 1
    assert sum("APT probes need the training forward" in t for t in text) == 1

    linear = nn.Linear(8, 3)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monitor"):
        monitor = Monitor(linear, optimizer, ListTransport(), every=1)
        for step in range(3):
            x, y = data(step)
            F.cross_entropy(linear(x), y).backward()
            optimizer.step()
        monitor.close()
    text = [r.getMessage() for r in caplog.records]
    assert sum("no activation site ran in step 0" in t for t in text) == 1


class AlertingTransport(ListTransport):
    """Answers one alert at the end of step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.polls = 0

    def poll_alerts(self) -> list[AlertValue]:
        self.polls += 1
        if self.polls - 1 != self.at:
            return []
        return [AlertValue(kind="divergence", step=self.at, message="D = 1 on every site")]


def run_with_policy(policy: str, steps: int = 4) -> tuple[Monitor, int]:
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor = Monitor(net, optimizer, AlertingTransport(at=1), every=1, on_alert=policy)
    done = 0
    for step in range(steps):
        x, y = data(step)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        done += 1
        if monitor.should_stop:
            break
    monitor.close()
    return monitor, done


def test_alert_policies(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(AlertRaised) as raised:
        run_with_policy("raise")
    assert raised.value.alert.kind == "divergence" and raised.value.alert.step == 1
    monitor, done = run_with_policy("stop")
    assert monitor.should_stop and done == 2
    with caplog.at_level(logging.WARNING, logger="monitor"):
        monitor, done = run_with_policy("warn")
    assert done == 4 and not monitor.should_stop
    assert any("D = 1 on every site" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="on_alert"):
        run_with_policy("ignore")


def test_decorated_micro_batch_function_with_the_step_outside_it() -> None:
    torch.manual_seed(4)
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    transport = ListTransport()
    monitor = Monitor(net, optimizer, transport, every=1)

    @monitor
    def micro_batch(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(net(x), y)
        (loss / 2).backward()
        return float(loss)

    losses = []
    for step in range(3):
        values = [micro_batch(*data(2 * step + i)) for i in range(2)]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(values) / 2)
    monitor.close()
    assert [s.loss for s in train_summaries(transport)] == pytest.approx(losses, rel=1e-6)
    assert monitor._losses == []


def test_amp_autocast_and_grad_scaler() -> None:
    """bf16 autocast on the CPU with a GradScaler: probes replay under the same autocast."""
    torch.manual_seed(5)
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    transport = ListTransport()
    monitor = Monitor(net, optimizer, transport, every=1, apt_every=1)

    def masks(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            h1 = net[0](x)
            h2 = net[2](h1.clamp(min=0))
        return {"1#0": h1 > 0, "3#0": h2 > 0}

    expected = []
    for step in range(3):
        x, y = data(step)
        before = masks(x)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        expected.append(changed(before, masks(x)))
    monitor.close()
    assert apt_counts(transport) == expected
    assert sum(sum(c.values()) for c in expected) > 0


class WithCriterion(nn.Module):
    """A holder whose loss is a registered module called on its own, after the network."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.criterion = nn.CrossEntropyLoss()


@pytest.mark.parametrize("closure", [False, True], ids=["plain", "closure"])
def test_a_loss_module_forward_does_not_replace_the_probed_batch(closure: bool) -> None:
    torch.manual_seed(6)
    outer = WithCriterion()
    optimizer = torch.optim.SGD(outer.parameters(), lr=0.5)
    transport = ListTransport()
    monitor = Monitor(outer, optimizer, transport, every=1, apt_every=1)
    expected, expected_on = [], []
    for step in range(3):
        x, y = data(step)
        before = oracle_masks(outer.net, x, "net.")

        def loss_of(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = outer.criterion(outer.net(x), y)
            loss.backward()
            return loss

        if closure:
            optimizer.step(loss_of)
        else:
            loss_of()
            optimizer.step()
        expected.append(changed(before, oracle_masks(outer.net, x, "net.")))
        expected_on.append({site: mask.sum(0).tolist() for site, mask in before.items()})
    monitor.close()
    assert apt_counts(transport) == expected
    assert [unit_on(s) for s in train_summaries(transport)] == expected_on


def test_probe_set_goes_through_the_submodule_training_calls() -> None:
    torch.manual_seed(7)
    outer = Outer()  # no forward of its own: model(probe) would raise
    optimizer = torch.optim.SGD(outer.parameters(), lr=0.5)
    transport = ListTransport()
    probe = torch.randn(20, 8)
    monitor = Monitor(outer, optimizer, transport, every=1, probe_set=probe, probe_every=1)
    expected = []
    for step in range(3):
        x, y = data(step)
        optimizer.zero_grad()
        F.cross_entropy(outer.net(x), y).backward()
        optimizer.step()
        masks = oracle_masks(outer.net, probe, "net.")
        expected.append({site: mask.sum(0).tolist() for site, mask in masks.items()})
    monitor.close()
    measured = [s for s in transport.summaries if s.source == "probe_set"]
    assert [s.step for s in measured] == [0, 1, 2]
    assert [unit_on(s) for s in measured] == expected
