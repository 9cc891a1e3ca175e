"""ActCoolLR in real training loops: bit-identical training, measured P against brute force,
corner cases, resume from state_dict, and its scalars through a monitor into SQLite."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from monitor.client import watch
from monitor.schedulers import ActCoolDivergence, ActCoolLR
from monitor.schedulers import actcool_model as m
from monitor.settings import Settings
from monitor.store import open_store
from tests.client.memory_transport import ListTransport


class Net(nn.Module):
    """Conv + BN + dropout + dense: every piece of state a probe must leave alone."""

    def __init__(self, norm: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(6 * 16, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = self.drop(nn.functional.max_pool2d(h, 2).flatten(1))
        return self.out(torch.relu(self.fc(h)))


def batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(steps)
    ]


def train(model, opt, data, sched=None, lrs=None) -> list[float]:
    used = []
    for step, (x, y) in enumerate(data):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[step]
        used.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return used


def fresh(seed: int = 0, adam: bool = False, **net):
    torch.manual_seed(seed)
    model = Net(**net)
    if adam:
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize("adam", [False, True])
def test_training_is_bit_identical_to_the_same_rates_set_by_hand(adam: bool) -> None:
    data = batches(30)
    model, opt = fresh(adam=adam)
    sched = ActCoolLR(opt, 30, model, t_start=1.0, probing_step_size=4)
    torch.manual_seed(123)
    used = train(model, opt, data, sched)
    rng_after = torch.get_rng_state()
    sched.close()
    assert sched.full_updates >= 1 and sched.probe_forwards > 8
    assert len(set(used)) > 20  # the schedule really moved the rate

    by_hand, opt_hand = fresh(adam=adam)
    torch.manual_seed(123)
    train(by_hand, opt_hand, data, lrs=used)
    assert torch.equal(torch.get_rng_state(), rng_after)  # probes replayed, then restored RNG
    for (name, a), b in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # parameters and BN running stats, bit for bit
    state = opt.state_dict()["state"]
    for key, value in opt_hand.state_dict()["state"].items():
        for slot, tensor in value.items():  # momentum buffer; Adam's moments and step
            assert torch.equal(state[key][slot], tensor), slot


def _brute_force_p(model: nn.Module, after: nn.Module, x: torch.Tensor) -> float:
    """Changed-row fraction per ReLU input (rows: samples x positions), geometric mean stay."""

    def preacts(net: nn.Module) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        relu = torch.relu

        def spy(t: torch.Tensor) -> torch.Tensor:
            seen.append(t.detach().clone())
            return relu(t)

        torch.relu = spy  # type: ignore[assignment]
        try:
            with torch.no_grad():
                net(x)
        finally:
            torch.relu = relu  # type: ignore[assignment]
        return seen

    stays = []
    for a, b in zip(preacts(model), preacts(after), strict=True):
        rows_a = (a > 0).movedim(1, -1).reshape(-1, a.shape[1])
        rows_b = (b > 0).movedim(1, -1).reshape(-1, b.shape[1])
        changed = sum(
            1 for ra, rb in zip(rows_a.tolist(), rows_b.tolist(), strict=True) if ra != rb
        )
        stays.append(1 - changed / len(rows_a))
    if min(stays) == 0:
        return 1.0
    return 1 - math.prod(stays) ** (1 / len(stays))


def test_measured_probability_matches_brute_force() -> None:
    model, opt = fresh(norm=False, dropout=0.0)
    opt.param_groups[0]["lr"] = 0.05
    sched = ActCoolLR(opt, 10, model)
    x, y = batches(1)[0]
    before = copy.deepcopy(model)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    measured = sched.p_measured
    sched.step()
    sched.close()
    expected = _brute_force_p(before, model, x)
    assert 0 < expected < 1
    assert measured == pytest.approx(expected, abs=1e-12)
    assert sched.last_scalars["T_measured"] == pytest.approx(-math.log2(1 - expected))
    assert sched.full_updates == 1  # the first measurement is a full update


def test_first_rate_is_the_optimizers_then_the_model_sets_it() -> None:
    model, opt = fresh()
    sched = ActCoolLR(opt, 20, model, t_start=1.0)
    assert sched.get_last_lr() == [0.01]
    train(model, opt, batches(1), sched)
    p_aim = 0.99 * (1 - 2 ** -sched.target_temperature(1))
    assert sched.get_last_lr()[0] == pytest.approx(m.learning_rate(p_aim, sched.sigma, sched.mu))
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
    sched.close()


def test_rate_below_eta_min_is_clamped_and_a_silent_step_forces_a_full_update() -> None:
    model, opt = fresh()
    sched = ActCoolLR(opt, 40, model, probing_step_size=4, eta_min=1e-5)
    assert sched.planned_lr(40) == sched.eta_min  # T = 0 asks for eta = 0
    train(model, opt, batches(1), sched)
    updates = sched.full_updates
    sched.mu = -80.0  # the model now asks for exp(-79): below eta_min
    sched.step()
    sched.step()
    sched.step()  # steps 1..3 pass without training: no measurement
    assert opt.param_groups[0]["lr"] == sched.eta_min
    train(model, opt, batches(1), None)  # step 4 at eta_min: D = 0
    assert sched.p_measured == 0.0
    assert sched.full_updates == updates + 1
    sched.close()


@pytest.mark.parametrize("mu", [40.0, math.nan])
def test_out_of_range_rate_stops_training_and_alerts_the_monitor(mu: float) -> None:
    model, opt = fresh()
    transport = ListTransport()
    seen = []
    mon = watch(model, opt, transport=transport, every=1, on_alert=seen.append)
    sched = ActCoolLR(opt, 20)  # model and monitor found through the optimizer
    assert sched.monitor is mon and sched.model is model
    train(model, opt, batches(2), sched)
    sched.mu = mu
    x, y = batches(1, seed=5)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(ActCoolDivergence, match="diverging") as caught:
        sched.step()
    mon.close()
    sched.close()
    alert = caught.value.alert
    assert alert.kind == "actcool_divergence" and alert.severity == "critical"
    assert seen == [alert] and mon.alerts == [alert]
    last = transport.summaries[-1]
    assert last.step == 2 and last.scalars is not None and last.scalars["actcool/diverged"] == 1.0


def test_state_dict_round_trip_resumes_the_same_schedule() -> None:
    data = batches(40, seed=3)
    model, opt = fresh()
    sched = ActCoolLR(opt, 40, model, t_start=1.2, probing_step_size=4)
    torch.manual_seed(7)
    first = train(model, opt, data[:18], sched)
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(sched.state_dict()),
        torch.get_rng_state(),
    )
    straight = train(model, opt, data[18:], sched)
    sched.close()

    resumed_model, resumed_opt = fresh(seed=99)
    resumed_model.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    resumed = ActCoolLR(resumed_opt, 1, resumed_model)  # hyperparameters come from the state
    resumed.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    again = train(resumed_model, resumed_opt, data[18:], resumed)
    resumed.close()
    assert resumed.total_steps == 40 and resumed.t_start == 1.2
    assert again == straight
    assert len(set(first + straight)) > 30


def test_scalars_reach_sqlite_and_the_report_draws_the_temperature(tmp_path: Path) -> None:
    from monitor.report import render_report

    model, opt = fresh()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", mlflow_tracking_uri="")
    mon = watch(model, opt, settings=settings, every=4)
    sched = ActCoolLR(opt, 12, monitor=mon, t_start=1.0, probing_step_size=4)
    used = train(model, opt, batches(12), sched)
    mon.close()
    sched.close()
    store = open_store(settings.database_url)
    lr = store.measures(mon.run_id, name="actcool/lr")
    assert [p.step for p in lr] == list(range(12))
    assert [p.value for p in lr] == pytest.approx(used)
    target = store.measures(mon.run_id, name="actcool/T_target")
    assert [p.value for p in target] == pytest.approx([1.0 * (1 - t / 12) for t in range(12)])
    measured = store.measures(mon.run_id, name="actcool/T_measured")
    assert [p.step for p in measured] == [0, 4, 8]
    assert not [a for a in store.alerts(mon.run_id) if a.kind == "actcool_divergence"]
    files = render_report(store, mon.run_id, tmp_path / "report")
    assert tmp_path / "report" / "actcool.png" in files


def test_divergence_is_a_stored_alert_and_an_mlflow_tag(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from monitor.schedulers import actcool
    from plugins import actcool_divergence

    assert actcool_divergence.KIND == actcool.DIVERGENCE_KIND
    assert actcool_divergence.DIVERGED_SCALAR == actcool.SCALAR_PREFIX + "diverged"
    model, opt = fresh()
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        mlflow_tracking_uri=mlflow_uri,
        mlflow_min_interval_seconds=0,  # every step's point, not one per 0.1 s
    )
    with watch(model, opt, settings=settings, every=8) as mon:
        sched = ActCoolLR(opt, 20, t_start=1.0)
        used = train(model, opt, batches(3), sched)
        sched.sigma = math.nan
        with pytest.raises(ActCoolDivergence):
            train(model, opt, batches(1), sched)
    sched.close()
    assert mon.wait_for_mlflow(timeout=300) is not None  # close() left MLflow to the host
    store = open_store(settings.database_url)
    alerts = store.alerts(mon.run_id)
    assert [(a.kind, a.step, a.severity) for a in alerts] == [("actcool_divergence", 3, "critical")]
    assert alerts[0].evidence["actcool/diverged"] == 1.0
    mlflow_run_id = store.run(mon.run_id).mlflow_run_id
    assert mlflow_run_id is not None
    client = MlflowClient(tracking_uri=mlflow_uri)
    history = sorted(client.get_metric_history(mlflow_run_id, "actcool/lr"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx(used)
    assert "apmon.alert.actcool_divergence" in client.get_run(mlflow_run_id).data.tags


def test_a_step_that_changes_every_pattern_forces_a_full_update() -> None:
    model, opt = fresh(norm=False, dropout=0.0)
    sched = ActCoolLR(opt, 40, model, probing_step_size=2)
    train(model, opt, batches(2), sched)  # step 0 (full update), step 1
    updates = sched.full_updates
    sched.sigma, sched.mu = 1.0, 19.0  # the model now asks for about e^20: every pattern flips
    sched.step()
    sched.step()  # skip to step 4, a measured one, at a rate from the new model
    assert opt.param_groups[0]["lr"] > 1e8
    train(model, opt, batches(1, seed=9), None)
    assert sched.p_measured == 1.0
    assert sched.full_updates == updates + 1
    sched.close()
