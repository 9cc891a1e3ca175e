"""APT probes and sensitivity sweeps against a brute-force reference.

The reference rebuilds the model from state dicts, replays the RNG state of the training
forward by hand, records ``input > 0`` of each ReLU module with its own forward hooks and
compares rows as Python tuples. Trial parameters of a sweep are checked against the optimizer
itself stepped with the trial learning rate (the linearity the sweep relies on).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from memory_transport import ListTransport
from torch import nn

from monitor.client.apt import (
    DEFAULT_SWEEP_ETAS,
    THESIS_SWEEP_ETAS,
    SitePatterns,
    apt_temperature,
    changed_rows,
    count_changes,
    log_grid,
    site_probes,
    take_rows,
    unit_dim,
)
from monitor.client.capture import rows_of
from monitor.client.handle import Monitor
from monitor.schema import ProbeRecord, SiteInfo, StepSummary


class Net(nn.Module):
    """Conv + batch norm + dropout, then dense + batch norm + dropout: two ReLU sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.drop2d = nn.Dropout2d(0.25)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(36, 16)
        self.bn1d = nn.BatchNorm1d(16)
        self.act2 = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.drop2d(self.act1(self.bn2d(self.conv(x)))))
        return self.fc2(self.drop(self.act2(self.bn1d(self.fc1(x.flatten(1))))))


SITES = {"act1#0": "act1", "act2#0": "act2"}


def reference_patterns(
    state: dict[str, torch.Tensor], x: torch.Tensor, rng: torch.Tensor
) -> dict[str, list[tuple[bool, ...]]]:
    """Patterns per site of a fresh Net loaded with ``state``, forwarded in training mode from
    RNG state ``rng``, as lists of tuples (one per row)."""
    net = Net()
    net.load_state_dict(state)
    net.train()
    found: dict[str, list[tuple[bool, ...]]] = {}

    def hook(site: str) -> Callable[..., None]:
        def record(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            pre = inputs[0]
            rows = pre.movedim(1, -1).reshape(-1, pre.shape[1]) if pre.dim() == 4 else pre
            found[site] = [tuple(bool(v > 0) for v in row) for row in rows.tolist()]

        return record

    for site, module in SITES.items():
        getattr(net, module).register_forward_hook(hook(site))
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    with torch.no_grad():
        net(x)
    torch.set_rng_state(saved)
    return found


def reference_changed(
    before: dict[str, list[tuple[bool, ...]]], after: dict[str, list[tuple[bool, ...]]]
) -> dict[str, int]:
    return {
        site: sum(1 for a, b in zip(before[site], after[site], strict=True) if a != b)
        for site in before
    }


def trial_state(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], factor: float
) -> dict[str, torch.Tensor]:
    """Buffers as they are after the step; parameters before + factor * (after - before)."""
    params = {n for n, _ in Net().named_parameters()}
    return {
        name: torch.add(before[name], after[name] - before[name], alpha=factor)
        if name in params
        else after[name]
        for name in after
    }


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "sgd-momentum-wd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2
    ),
    "sgd-nesterov": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3
    ),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "groups": lambda m: torch.optim.SGD(
        [
            {"params": [*m.fc1.parameters(), *m.fc2.parameters(), *m.bn1d.parameters()]},
            {"params": [*m.conv.parameters(), *m.bn2d.parameters()], "lr": 0.2},
        ],
        lr=0.05,
        momentum=0.5,
    ),
}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 3, 6, 6, generator=g), torch.randint(0, 3, (12,), generator=g)


@pytest.mark.parametrize(
    ("name", "probe_rows"),
    [(name, None) for name in sorted(OPTIMIZERS)] + [("adamw", 5), ("groups", 5)],
)
def test_apt_and_sweep_match_brute_force(name: str, probe_rows: int | None) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = OPTIMIZERS[name](model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    etas = (1e-3, 1e-2, 0.1, 1.0, 10.0)
    recorder = ListTransport()
    monitor = Monitor(
        model,
        optimizer,
        recorder,
        every=1000,
        apt_every=2,
        sweep_every=lambda s: s in (3, 4),
        sweep_etas=etas,
        probe_rows=probe_rows,
    )
    expected: dict[tuple[str, int], dict[str, list[int]]] = {}
    used_lr: dict[int, float] = {}
    for step in range(6):
        x, y = batch(step)
        rng = torch.get_rng_state()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        before = snapshot(model)
        used_lr[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        after = snapshot(model)
        rows = x if probe_rows is None else x[:probe_rows]
        ref_before = reference_patterns(before, rows, rng)
        if step % 2 == 0:
            changed = reference_changed(ref_before, reference_patterns(after, rows, rng))
            expected[("apt", step)] = {s: [c] for s, c in changed.items()}
        if step in (3, 4):
            per_eta = [
                reference_changed(
                    ref_before,
                    reference_patterns(trial_state(before, after, eta / used_lr[step]), rows, rng),
                )
                for eta in etas
            ]
            expected[("sweep", step)] = {s: [c[s] for c in per_eta] for s in SITES}
    monitor.close()

    records = recorder.probes_of("apt") + recorder.probes_of("sweep")
    assert sorted((r.kind, r.step) for r in records) == sorted(expected)
    n = 12 if probe_rows is None else probe_rows
    for record in records:
        assert record.lr == used_lr[record.step]
        assert not record.nonfinite
        got = {s.site: s.changed for s in record.sites}
        assert got == expected[(record.kind, record.step)], (record.kind, record.step)
        rows = {s.site: s.rows for s in record.sites}
        assert rows == {"act1#0": n * 36, "act2#0": n}
        for s in record.sites:
            assert s.etas == ([record.lr] if record.kind == "apt" else list(etas))
    # The sweep saw something happen: more change at larger trial rates.
    sweep = recorder.probes_of("sweep")[0]
    assert any(s.changed[-1] > s.changed[0] for s in sweep.sites)
    # Sites were announced before the first probe that uses them.
    first_probe = next(i for i, e in enumerate(recorder.events) if isinstance(e, ProbeRecord))
    announced = {e.name for e in recorder.events[:first_probe] if isinstance(e, SiteInfo)}
    assert announced == set(SITES)


def _clone_optimizer(
    factory: OptimizerFactory, model: nn.Module, state: dict[str, Any], scale: float
) -> torch.optim.Optimizer:
    optimizer = factory(model)
    optimizer.load_state_dict(copy.deepcopy(state))
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
    return optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_is_linear_in_the_learning_rate(name: str) -> None:
    """theta_t + (eta / eta_t) * delta equals the optimizer's own step at eta (all groups scaled
    by eta / eta_t), for every supported optimizer, after a few steps of state."""
    torch.manual_seed(1)
    factory = OPTIMIZERS[name]
    model = Net()
    optimizer = factory(model)
    for step in range(4):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if step < 3:
            optimizer.step()
    before = snapshot(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = copy.deepcopy(optimizer.state_dict())
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    after = snapshot(model)
    sharpness = 0.0
    for eta in (lr * 1e-2, lr * 0.3, lr, lr * 7.0, lr * 100.0):
        trial = trial_state(before, after, eta / lr)
        ref = Net()
        ref.load_state_dict(before)
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        _clone_optimizer(factory, ref, state, eta / lr).step()
        for n, p in ref.named_parameters():
            # delta = theta_{t+1} - theta_t carries the rounding of theta_{t+1} (eps |theta|),
            # which the sweep scales by eta / eta_t: that, and no more, is allowed.
            factor = eta / lr
            update = float((p.detach() - before[n]).abs().max())
            eps = torch.finfo(torch.float32).eps
            atol = 4 * eps * (float(before[n].abs().max()) * (1 + factor) + update)
            torch.testing.assert_close(trial[n], p.detach(), rtol=0, atol=atol)
            sharpness = max(sharpness, update / atol)
    assert sharpness > 1000  # the tolerance is far below the size of the updates


def test_sweep_leaves_model_optimizer_and_rng_alone() -> None:
    torch.manual_seed(2)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = Monitor(model, optimizer, ListTransport(), every=1000, apt_every=1, sweep_every=1)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    prober = monitor.prober
    assert prober is not None
    armed = monitor.tracker.armed
    prober.before_step(0, optimizer)
    state_before = snapshot(model)
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    records = prober.after_step(0)
    assert [r.kind for r in records] == ["apt", "sweep"]
    assert len(records[1].sites[0].changed) == len(DEFAULT_SWEEP_ETAS)
    for k, v in snapshot(model).items():
        assert torch.equal(v, state_before[k]), k
    assert str(optimizer.state_dict()) == str(opt_state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert monitor.tracker.armed is armed
    assert monitor.tracker.on_site == monitor._record_site and monitor.tracker.require_grad
    monitor.close()


def test_no_probe_hooks_without_probes() -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = len(model._forward_pre_hooks)
    monitor = Monitor(model, optimizer, ListTransport(), every=1, apt_every=None)
    assert monitor.prober is None
    assert len(model._forward_pre_hooks) == hooks + 1  # the tracker's root hook only
    monitor.close()
    probed = Monitor(model, optimizer, ListTransport(), every=1, apt_every=4)
    # Probes keep their inputs through the tracker's hooks: none of their own on the model.
    assert len(model._forward_pre_hooks) == hooks + 1
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    probed.close()
    assert len(model._forward_pre_hooks) == hooks
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_failing_probe_is_logged_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """Batch norm cannot run on one row in training mode: the probe fails, training does not."""
    torch.manual_seed(3)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = ListTransport()
    rng = torch.get_rng_state()
    with (
        caplog.at_level(logging.ERROR),
        Monitor(model, optimizer, recorder, every=1, apt_every=1, sweep_every=1, probe_rows=1),
    ):
        for step in range(3):
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert recorder.probes_of("apt") == [] and recorder.probes_of("sweep") == []
    assert any("probe failed before step" in r.getMessage() for r in caplog.records)
    summaries = recorder.summaries
    assert [s.step for s in summaries] == [0, 1, 2]
    # Same parameters as without the monitor.
    torch.set_rng_state(rng)
    torch.manual_seed(3)
    plain = Net()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(step)
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        plain_opt.zero_grad()
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_nonfinite_preactivations_are_flagged() -> None:
    torch.manual_seed(4)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = ListTransport()
    with Monitor(model, optimizer, recorder, every=1000, apt_every=1):
        for step in range(2):
            x, _ = batch(step)
            if step == 1:
                x[0, 0, 0, 0] = float("inf")
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert [r.nonfinite for r in recorder.probes_of("apt")] == [False, True]


def test_validation_forwards_and_unscheduled_steps_are_not_probed() -> None:
    torch.manual_seed(5)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = ListTransport()
    with Monitor(model, optimizer, recorder, every=1000, apt_every=3):
        for step in range(7):
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                model(torch.randn(2, 3, 6, 6))  # a no-grad forward never replaces the batch
            optimizer.step()
            optimizer.zero_grad()
    assert [r.step for r in recorder.probes_of("apt")] == [0, 3, 6]
    assert all(s.rows in (12, 12 * 36) for r in recorder.probes_of("apt") for s in r.sites)


def test_temperature_grid_and_row_helpers() -> None:
    assert apt_temperature(0.0) == 0.0
    assert apt_temperature(0.5) == pytest.approx(math.log(2))
    assert apt_temperature(1.0) == math.inf
    grid = log_grid(1e-4, 1e2, 50)
    assert grid == THESIS_SWEEP_ETAS and len(DEFAULT_SWEEP_ETAS) == 16
    assert grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(1e2)
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert max(ratios) == pytest.approx(min(ratios))
    with pytest.raises(ValueError):
        log_grid(0.0, 1.0, 3)

    g = torch.Generator().manual_seed(6)
    a = torch.rand(200, 70, generator=g) > 0.5
    b = a.clone()
    flip = torch.rand(200, 70, generator=g) > 0.995
    b[flip] = ~b[flip]
    naive = sum(1 for r, s in zip(a.tolist(), b.tolist(), strict=True) if r != s)
    assert changed_rows(a, b) == naive and 0 < naive < 200

    x, mask, scale = torch.ones(10, 3), torch.zeros(10, dtype=torch.bool), torch.ones(3)
    args, kwargs = take_rows((x, scale), {"mask": mask, "k": 2}, 4)
    assert args[0].shape == (4, 3) and args[1].shape == (3,)
    assert kwargs["mask"].shape == (4,) and kwargs["k"] == 2
    assert take_rows((x,), {}, None)[0][0] is x and take_rows((x,), {}, 50)[0][0] is x


def test_probes_leave_pattern_summaries_alone() -> None:
    """On full-batch probes the tracker is lent to the probe for the training forward: the
    pattern summaries must be exactly those of a run without probes (same steps, same values)."""

    def summaries(**probes: Any) -> list[StepSummary]:
        torch.manual_seed(7)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        recorder = ListTransport()
        with Monitor(model, optimizer, recorder, every=3, **probes):
            for step in range(7):
                x, y = batch(step)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        if probes:
            assert len(recorder.probes_of("apt")) == 4 and len(recorder.probes_of("sweep")) == 2
        return recorder.summaries

    plain = summaries()
    probed = summaries(apt_every=2, sweep_every=5)
    assert [s.step for s in plain] == [0, 3, 6]
    assert [s.model_dump() for s in probed] == [s.model_dump() for s in plain]


def test_sites_missing_from_a_trial_are_left_out() -> None:
    """Data-dependent control flow: a site that one trial forward did not reach has no D(eta)."""
    ones = torch.ones(4, 3, dtype=torch.bool)
    before = SitePatterns(masks={"a#0": ones, "b#0": ones})
    flipped = ones.clone()
    flipped[1, 2] = False
    full = SitePatterns(masks={"a#0": flipped, "b#0": ones})
    partial = SitePatterns(masks={"a#0": ones, "b#0": ones[:2]})
    changes = [count_changes(before, full), count_changes(before, partial)]
    assert changes == [{"a#0": 1, "b#0": 0}, {"a#0": 0, "b#0": None}]
    (probe,) = site_probes(before, changes, [0.1, 1.0])
    assert (probe.site, probe.rows, probe.etas, probe.changed) == ("a#0", 4, [0.1, 1.0], [1, 0])


@pytest.mark.parametrize("shape", [(7,), (9, 5), (4, 6, 5), (3, 4, 5, 6), (2, 3, 4, 2, 3)])
def test_native_layout_counts_match_rows_of(shape: tuple[int, ...]) -> None:
    """Changed rows counted in the activation's own layout equal those counted on the
    (rows, units) view of ``capture.rows_of`` by a Python loop, for every site kind."""
    g = torch.Generator().manual_seed(len(shape))
    a = torch.randn(shape, generator=g)
    b = a + 0.3 * torch.randn(shape, generator=g)
    dim = unit_dim(a)
    rows_a, _ = rows_of(a)
    rows_b, _ = rows_of(b)
    naive = sum(
        1 for r, t in zip((rows_a > 0).tolist(), (rows_b > 0).tolist(), strict=True) if r != t
    )
    assert changed_rows(a > 0, b > 0, dim) == naive
    patterns = SitePatterns(masks={"s#0": a > 0}, dims={"s#0": dim})
    assert patterns.rows("s#0") == rows_a.shape[0]
