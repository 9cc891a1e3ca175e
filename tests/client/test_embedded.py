"""The embedded pipeline: a real host process, a real SQLite file, real torch training.

Alerts reach ``on_alert`` by the end of the step after the one that raised them, once each and in
step order; everything sent is stored; a host that dies or cannot start never stops training.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from monitor.client import Monitor, watch
from monitor.schema import AlertValue
from monitor.settings import Settings
from monitor.store import open_store


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _square_loss_step(
    model: nn.Module, opt: torch.optim.Optimizer
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A plain training step on a batch ``x`` (the mean square of the outputs), to decorate."""

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    return step


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'apmon.db'}",
        mlflow_tracking_uri="",
        alert_wait_seconds=60.0,  # a loaded CI machine must not turn waits into misses
        **extra,  # type: ignore[arg-type]
    )


def _wait_until_started(mon: object) -> None:
    """Train only once the host answers, so that every step's alert can be waited for."""
    transport = mon.transport  # type: ignore[attr-defined]
    for _ in range(600):
        transport.poll_alerts()
        if transport._started:
            return
        time.sleep(0.1)
    raise AssertionError("the host process did not start within 60 s")


class Received:
    """An ``on_alert`` that keeps every alert with the number of steps the job had finished."""

    def __init__(self) -> None:
        self.received: list[tuple[AlertValue, int]] = []
        self.finished = 0

    def __call__(self, alert: AlertValue) -> None:
        self.received.append((alert, self.finished))


def _train_with_nan_at(
    tmp_path: Path, bad_step: int, **options: object
) -> tuple[Monitor, list[tuple[AlertValue, int]]]:
    """12 decorated steps, a NaN input at ``bad_step`` (non-finite activations: a hard
    divergence sign); every alert ``on_alert`` got, with the steps the job had finished then."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    on_alert = Received()
    mon = watch(model, opt, settings=_settings(tmp_path), on_alert=on_alert, **options)  # type: ignore[arg-type]
    _wait_until_started(mon)

    step = mon(_square_loss_step(model, opt))

    for i in range(12):
        x = torch.randn(8, 6)
        if i == bad_step:
            x[0, 0] = float("nan")
        step(x)
        on_alert.finished += 1
    mon.close()
    return mon, on_alert.received


def test_an_alert_reaches_on_alert_by_the_end_of_the_next_step(tmp_path: Path) -> None:
    bad_step = 7
    mon, received = _train_with_nan_at(tmp_path, bad_step)
    divergence = [done for alert, done in received if alert.step == bad_step]
    assert divergence, received
    # Received inside the step function of step 8 at the latest: the job had finished <= 8 steps.
    assert divergence[0] <= bad_step + 1
    # Once each, in step order, and mon.alerts holds the same alerts.
    assert [a.step for a in mon.alerts] == sorted(a.step for a in mon.alerts)
    assert len(mon.alerts) == len(received)
    keys = [(a.kind, a.step, a.site) for a in mon.alerts]
    assert len(keys) == len(set(keys))
    stored = open_store(_settings(tmp_path).database_url).alerts(mon.run_id)
    assert sorted((a.kind, a.step) for a in stored) == sorted((a.kind, a.step) for a in mon.alerts)


def test_a_probes_alert_reaches_on_alert_within_the_probes_own_step(tmp_path: Path) -> None:
    """An APT probe's alert is waited for at the end of its step, not of the next one."""
    bad_step = 7  # the probe of step 7 sees non-finite activations
    _mon, received = _train_with_nan_at(tmp_path, bad_step, apt_every=1)
    first = [(alert, done) for alert, done in received if alert.step == bad_step]
    assert first, received
    alert, done_when_received = first[0]
    assert alert.kind == "divergence" and "probe" in alert.message, alert
    assert done_when_received == bad_step  # received before step 7's function returned


def _leave_the_host_behind(transport: Any, train: Callable[[int], None], steps: int) -> None:
    """Stop the host process while ``train(steps)`` runs (after ``alert_wait_seconds`` training
    no longer waits for a host that does not move), resume it, and return once it moves again:
    far behind, and waited for again."""
    host = transport._process.pid
    os.kill(host, signal.SIGSTOP)
    try:
        train(steps)
    finally:
        os.kill(host, signal.SIGCONT)
    stalled_at = transport._marks_seen
    while transport._marks_seen == stalled_at:
        transport.poll_alerts()
        time.sleep(0.001)


def test_a_probes_alert_arrives_in_its_own_step_behind_a_host_still_catching_up(
    tmp_path: Path,
) -> None:
    """A host far behind (here: stopped, then resumed, as after a late start) is caught up at
    half its pace; a probe's step waits for it the whole way, so the probe's alert is in time."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    on_alert = Received()
    probe_at: list[int] = []
    mon = watch(
        model,
        opt,
        settings=_settings(tmp_path).model_copy(update={"alert_wait_seconds": 1.0}),
        on_alert=on_alert,
        apt_every=probe_at.__contains__,
    )
    _wait_until_started(mon)
    transport: Any = mon.transport  # its private counters: the test reads the host's progress

    step = mon(_square_loss_step(model, opt))

    def train(steps: int) -> None:
        for _ in range(steps):
            step(torch.randn(8, 6))
            on_alert.finished += 1

    train(3)
    _leave_the_host_behind(transport, train, 200)
    behind = transport._marks_sent - transport._marks_seen
    bad_step = mon.step
    probe_at.append(bad_step)  # this step's probe sees a NaN: a divergence alert
    x = torch.randn(8, 6)
    x[0, 0] = float("nan")
    step(x)
    on_alert.finished += 1
    train(3)
    mon.close()
    first = [done for alert, done in on_alert.received if alert.step == bad_step]
    assert first, on_alert.received
    assert behind > 20, behind
    assert first[0] == bad_step, (first[0], bad_step, behind)  # before its step function returned


def test_a_slow_host_past_the_waits_limit_is_not_taken_for_a_stalled_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe's whole wait that outlasts ``alert_wait_seconds`` behind a host that moves, only
    slowly (here: stopped and resumed in turns), says so and keeps waiting for it later on."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe_at: list[int] = []
    settings = _settings(tmp_path).model_copy(update={"alert_wait_seconds": 0.3})
    mon = watch(model, opt, settings=settings, apt_every=probe_at.__contains__)
    _wait_until_started(mon)
    transport: Any = mon.transport
    step = mon(_square_loss_step(model, opt))

    def train(steps: int) -> None:
        for _ in range(steps):
            step(torch.randn(8, 6))

    _leave_the_host_behind(transport, train, 300)
    host = transport._process.pid
    stop = threading.Event()

    def crawl() -> None:  # the host runs 5 ms in every 60 ms: it moves, slowly
        while not stop.is_set():
            os.kill(host, signal.SIGSTOP)
            time.sleep(0.055)
            os.kill(host, signal.SIGCONT)
            time.sleep(0.005)

    crawler = threading.Thread(target=crawl)
    crawler.start()
    try:
        probe_at.append(mon.step)
        with caplog.at_level(logging.WARNING, logger="monitor.client.embedded"):
            step(torch.randn(8, 6))
    finally:
        stop.set()
        crawler.join()
        os.kill(host, signal.SIGCONT)
    mon.close()
    assert "steps behind after a 0.3 s wait" in caplog.text, caplog.text
    assert "made no progress" not in caplog.text.split("steps behind")[-1], caplog.text


def test_while_the_rate_surges_a_losss_alert_arrives_within_its_own_step(tmp_path: Path) -> None:
    """At 10x its median the rate surges: each step waits for its own summary to be judged.

    The loss the step returns is calm (about 1) until step 50, then 100: the divergence
    detector's "loss heat" rule (the rate >= 3x its median, the loss out of its band) alerts on
    step 50's summary, and ``on_alert`` gets it before step 50's function returns.
    """
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    on_alert = Received()
    mon = watch(model, opt, settings=_settings(tmp_path), on_alert=on_alert, apt_every=None)
    _wait_until_started(mon)

    @mon
    def step(x: torch.Tensor, reported: float) -> float:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return reported

    for i in range(56):
        if i == 40:
            for group in opt.param_groups:
                group["lr"] = 0.01
        step(torch.randn(8, 6), 100.0 if i == 50 else 1.0 + 0.01 * (i % 7))
        on_alert.finished += 1
    mon.close()
    heat = [
        (alert.step, done)
        for alert, done in on_alert.received
        if alert.kind == "divergence" and (alert.evidence or {}).get("signal") == "loss_heat"
    ]
    assert heat == [(50, 50)], on_alert.received


def test_every_step_is_stored_once_with_its_loss(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # Patterns counted and stored on every step: no capture budget, no storage budget.
    settings = _settings(tmp_path).model_copy(update={"host_store_fraction": 0.0})
    mon = watch(model, opt, settings=settings, apt_every=1, capture_budget=None)

    @mon
    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    losses = [float(step(torch.randn(8, 6))) for _ in range(40)]
    mon.close()
    store = open_store(_settings(tmp_path).database_url)
    summaries = list(store.step_summaries(mon.run_id, "train"))
    assert [s.step for s in summaries] == list(range(40))
    assert [s.loss for s in summaries] == pytest.approx(losses)
    assert sorted({p.step for p in store.probes(mon.run_id)}) == list(range(40))
    assert store.run(mon.run_id).status == "finished"
    assert mon.transport.failures == 0  # type: ignore[attr-defined]
    # What the run cost the training side is stored with it.
    (dropped,) = store.measures(mon.run_id, name="monitor/dropped_records")
    assert (dropped.step, dropped.value) == (39, 0.0)
    (waited,) = store.measures(mon.run_id, name="monitor/waited_seconds")
    assert waited.value == pytest.approx(mon.transport.waited_seconds)  # type: ignore[attr-defined]


def test_a_killed_host_never_stops_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = watch(model, opt, settings=_settings(tmp_path))
    _wait_until_started(mon)
    transport = mon.transport
    with caplog.at_level(logging.ERROR):
        for i in range(30):
            if i == 10:
                os.kill(transport._process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
                transport._process.wait()  # type: ignore[attr-defined]
            opt.zero_grad()
            model(torch.randn(8, 6)).sum().backward()
            opt.step()
        mon.close()
    assert mon.step == 30
    assert "host process" in caplog.text


def test_a_store_that_cannot_open_costs_no_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    settings = Settings(database_url=f"sqlite:///{blocked / 'apmon.db'}", mlflow_tracking_uri="")
    with caplog.at_level(logging.ERROR):
        mon = watch(model, opt, settings=settings)
        for _ in range(20):
            opt.zero_grad()
            model(torch.randn(8, 6)).sum().backward()
            opt.step()
        mon.close()
    assert mon.step == 20
    assert "could not start the run's host" in caplog.text


def test_records_reach_the_host_in_step_order_with_probes_every_step(tmp_path: Path) -> None:
    from memory_transport import ListTransport

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    transport = ListTransport()
    mon = watch(model, opt, transport=transport, apt_every=1)

    step = mon(_square_loss_step(model, opt))

    for _ in range(6):
        step(torch.randn(8, 6))
    mon.close()
    steps = [e.step for e in transport.events if hasattr(e, "step")]
    assert steps == sorted(steps)
    assert len(transport.summaries) == 6 and len(transport.probes) == 6


def test_a_host_that_stops_reading_costs_bounded_memory_and_is_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # Wide sites make records of several kB: 400 steps overflow the 1 MiB pipe and the buffer.
    model = nn.Sequential(nn.Linear(6, 1024), nn.ReLU(), nn.Linear(1024, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'apmon.db'}",
        mlflow_tracking_uri="",
        alert_wait_seconds=0.2,
        embedded_buffer_bytes=64 * 1024,
    )
    mon = watch(model, opt, settings=settings, apt_every=None)  # summaries only: counts below
    _wait_until_started(mon)
    transport = mon.transport
    pid = transport._process.pid  # type: ignore[attr-defined]

    @mon
    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(5):
        step(torch.randn(64, 6))
    os.kill(pid, signal.SIGSTOP)  # the host stops reading: the pipe fills, then the buffer
    try:
        for _ in range(400):
            step(torch.randn(64, 6))
            assert transport._unsent_bytes <= 64 * 1024  # type: ignore[attr-defined]
    finally:
        os.kill(pid, signal.SIGCONT)
    mon.close()
    assert mon.step == 405
    assert transport.late_marks >= 1  # type: ignore[attr-defined]
    assert transport.dropped > 0  # type: ignore[attr-defined]
    store = open_store(settings.database_url)
    (dropped,) = store.measures(mon.run_id, name="monitor/dropped_records")
    assert dropped.value == transport.dropped  # type: ignore[attr-defined]
    stored = len(list(store.step_summaries(mon.run_id, "train")))
    assert stored < 405  # the oldest records past the bound were dropped, as counted
    assert store.run(mon.run_id).status == "finished"


def test_a_host_that_cannot_be_started_costs_no_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monkeypatch.setattr("sys.executable", str(tmp_path / "no-such-python"))
    with caplog.at_level(logging.ERROR):
        mon = watch(model, opt, settings=_settings(tmp_path))
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 6)).sum().backward()
            opt.step()
        mon.close()
    assert mon.step == 5
    assert "could not start its host process" in caplog.text


def test_a_killed_training_job_still_gets_its_run_stored_and_finished(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        """
import os, signal, sys, time
import torch
from torch import nn
from monitor.client import watch
from monitor.settings import Settings

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
settings = Settings(database_url=sys.argv[1], mlflow_tracking_uri="", host_store_fraction=0)
mon = watch(model, opt, settings=settings, capture_budget=None)  # every step stored in full
for _ in range(25):
    opt.zero_grad()
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
print(mon.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: the job is gone
"""
    )
    url = f"sqlite:///{tmp_path / 'apmon.db'}"
    done = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    run_id = done.stdout.strip()
    for _ in range(600):  # the orphaned host finishes the run on its own
        store = open_store(url)
        if store.run(run_id).status == "finished":
            break
        time.sleep(0.1)
    assert store.run(run_id).status == "finished"
    assert [s.step for s in store.step_summaries(run_id, "train")] == list(range(25))
