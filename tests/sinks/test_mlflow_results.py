"""MLflow as users see it, in a real MLflow store: where runs land, loss, lr, keys, alerts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from monitor.host_process import RunHost
from monitor.schema import AlertValue, MeasureValue, RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.settings import Settings
from monitor.sinks.mlflow_sink import MlflowSink
from monitor.store import PluginOutcome, open_store

SCRIPT = Path(__file__).with_name("train_script.py")
SUMMARY_KEY_BOUND = 60  # "a few tens of keys at most whatever the model size"


def _train(tmp_path: Path, case: str, **env: str) -> tuple[dict, str, str]:
    db = f"sqlite:///{tmp_path / 'apmon.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "APMON_"))}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), db, uri, case],
        capture_output=True,
        text=True,
        timeout=600,
        env={**environment, **env},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), db, uri


def test_runs_land_in_the_active_run_the_experiment_or_the_given_run(tmp_path: Path) -> None:
    ids, _, uri = _train(tmp_path, "tracking")
    client = MlflowClient(tracking_uri=uri)
    mine = client.get_experiment_by_name("mine")
    assert mine is not None and client.get_experiment_by_name("apmon") is None
    active, logged = ids["active"]
    assert logged == active  # apmon logged into the user's active run
    own, logged = ids["explicit"]
    assert logged == own  # watch(mlflow_run_id=...)
    created = client.get_run(ids["experiment"])
    assert created.info.experiment_id == mine.experiment_id  # mlflow.set_experiment("mine")
    assert created.data.tags["mlflow.source.name"] == str(SCRIPT)  # "Source"
    assert created.data.tags["mlflow.user"]  # "Created by"
    assert created.data.tags["mlflow.source.type"] == "LOCAL"
    assert created.info.status == "FINISHED"  # apmon ends the runs it made
    for run_id in (active, own, ids["experiment"]):
        run = client.get_run(run_id)
        assert "apmon.run_id" in run.data.tags
        # six steps with two parameter groups: every step's loss and both learning rates
        loss = client.get_metric_history(run_id, "train/loss")
        # step 0's summary leaves before the first record_loss (see Monitor.record_loss)
        assert [m.step for m in loss] == list(range(1, 6))
        assert [m.value for m in client.get_metric_history(run_id, "lr/group0")] == [0.05] * 6
        assert [m.value for m in client.get_metric_history(run_id, "lr/group1")] == [0.01] * 6
    assert client.get_run(active).info.status == "FINISHED"  # the user's `with` ended it
    assert client.get_run(own).info.status == "RUNNING"  # apmon never ends a run it did not make


def test_mlflow_experiment_name_picks_the_experiment(tmp_path: Path) -> None:
    ids, _, uri = _train(tmp_path, "env", MLFLOW_EXPERIMENT_NAME="from-env")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("from-env")
    assert experiment is not None
    assert client.get_run(ids["env"]).info.experiment_id == experiment.experiment_id


def test_summary_keys_stay_a_few_tens_for_resnet18(tmp_path: Path) -> None:
    ids, db, uri = _train(tmp_path, "resnet18")
    keys = set(MlflowClient(tracking_uri=uri).get_run(ids["resnet18"]).data.metrics)
    store = open_store(db)
    (run,) = store.runs()
    sites = {p.site for p in store.measures(run.id) if p.site is not None}
    assert len(sites) >= 17  # resnet18's ReLU sites: per-site keys would be hundreds
    assert {"train/loss", "lr/group0", "lr/group1"} <= keys
    assert any(key.startswith("apt/T_mean") for key in keys)
    assert len(keys) <= SUMMARY_KEY_BOUND, sorted(keys)
    assert not any(site.replace("#", ":") in key for key in keys for site in sites)


def _alert(kind: str, step: int, message: str) -> tuple[str, AlertValue]:
    return ("detector", AlertValue(kind=kind, step=step, message=message))


def test_alert_tags_count_each_kind_and_show_the_latest(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = MlflowSink(uri, "alerts", "run")
    for step in range(7):
        outcome = PluginOutcome("train")
        outcome.alerts = [_alert("bad_batch", step, f"batch of step {step} " + "x" * 400)]
        if step == 3:
            outcome.alerts.append(_alert("divergence", 3, "loss left its band"))
        sink("apmon-run", step, outcome)
    sink.close()
    client = MlflowClient(tracking_uri=uri)
    tags = client.get_run(sink.run_id).data.tags
    assert tags["apmon.alert.divergence"] == "1 (latest step 3: loss left its band)"
    bad = tags["apmon.alert.bad_batch"]
    assert bad.startswith("7 (latest step 6: batch of step 6 xxx") and len(bad) < 200
    history = client.get_metric_history(sink.run_id, "alerts/bad_batch")
    assert [(m.step, m.value) for m in history] == [(s, s + 1.0) for s in range(7)]


def test_a_finished_embedded_run_attaches_its_report_and_every_alert(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'apmon.db'}",
        mlflow_tracking_uri=uri,
        mlflow_experiment="reports",
    )
    sites = [SiteInfo(name="fc#0", kind="dense", units=4)]
    host = RunHost(settings, "run-1", RunStart(name="r", sites=sites, user="ada"))
    for step in range(5):
        summary = SiteSummary(
            site="fc#0", rows=4, distinct=2, spectrum=[(2, 2)], unit_on=[4, 2, 0, 1]
        )
        host.handle(StepSummary(step=step, sites=[summary], loss=1.0 / (step + 1)))
    host.persist()
    outcome = PluginOutcome("train")
    outcome.alerts = [_alert("bad_batch", 2, "a"), _alert("bad_batch", 4, "b")]
    outcome.measures = [("p", "1", MeasureValue(name="dead", value=0.25, site="fc#0"))]
    host.store.save_outcome("run-1", 4, outcome)
    host.finish(4)
    host.close_mlflow()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(host.mlflow_run_id)
    assert run.data.tags["mlflow.user"] == "ada"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "apmon-report")}
    assert {"apmon-report/report.html", "apmon-report/alerts.json"} <= files
    local = client.download_artifacts(run.info.run_id, "apmon-report/alerts.json", str(tmp_path))
    listed = json.loads(Path(local).read_text())
    assert [(a["kind"], a["step"], a["message"]) for a in listed] == [
        ("bad_batch", 2, "a"),
        ("bad_batch", 4, "b"),
    ]
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("delay", [0.0, 600.0])
def test_the_mirror_starts_after_its_delay_or_at_the_runs_end(tmp_path: Path, delay: float) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'apmon.db'}",
        mlflow_tracking_uri=uri,
        mlflow_min_interval_seconds=0,
        mlflow_start_delay_seconds=delay,
    )
    sites = [SiteInfo(name="fc#0", kind="dense", units=4)]
    host = RunHost(settings, "run-1", RunStart(name="r", sites=sites))
    assert host.mlflow is not None
    for step in range(5):
        summary = SiteSummary(
            site="fc#0", rows=4, distinct=2, spectrum=[(2, 2)], unit_on=[4, 2, 0, 1]
        )
        host.handle(StepSummary(step=step, sites=[summary], loss=1.0 / (step + 1)))
    host.persist()
    deadline = time.monotonic() + 120
    while delay == 0 and not host.mlflow.is_open and time.monotonic() < deadline:
        time.sleep(0.1)
    # No delay: open while the run goes on. A delay longer than the run: not even started
    assert host.mlflow.is_open == (delay == 0)
    assert (host.mlflow._process is None) == (delay > 0)
    host.finish(4)
    host.close_mlflow()  # the run's end starts a mirror that was waiting, and fills it in
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(host.mlflow_run_id).info.status == "FINISHED"
    history = client.get_metric_history(host.mlflow_run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]


@pytest.mark.parametrize("configured", ["", "named"])
def test_experiment_resolution_prefers_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configured: str
) -> None:
    from monitor.sinks.tracking import experiment_id

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    chosen = client.create_experiment("chosen")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen)
    got = client.get_experiment(experiment_id(client, configured)).name
    assert got == (configured or "chosen")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    assert client.get_experiment(experiment_id(client, "")).name == "apmon"


def test_the_training_process_never_imports_mlflow(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        """
import sys
import time
import torch
from torch import nn
from monitor.client import watch
from monitor.settings import Settings

model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
settings = Settings(database_url=sys.argv[1], mlflow_tracking_uri=sys.argv[2])
with watch(model, opt, settings=settings) as mon:
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
print(mon.wait_for_mlflow(timeout=300), "mlflow" in sys.modules)
"""
    )
    db, uri = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'm.db'}"
    done = subprocess.run(
        [sys.executable, str(script), db, uri], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow_run_id, imported = done.stdout.split()
    assert imported == "False"  # the host process logged to MLflow; this one never loaded it
    assert MlflowClient(tracking_uri=uri).get_run(mlflow_run_id).info.status == "FINISHED"


@pytest.mark.parametrize("close_waits", [False, True])
def test_mlflow_gets_the_whole_run_after_close_or_before_it(
    tmp_path: Path, close_waits: bool
) -> None:
    """Default: close() returns before MLflow is complete and the host, outliving the job that
    exits at once, finishes it. ``mlflow_close_waits``: MLflow is complete when close() returns."""
    script = tmp_path / "job.py"
    script.write_text(
        """
import sys
import time
import torch
from torch import nn
from monitor.client import watch
from monitor.settings import Settings

model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
settings = Settings(
    database_url=sys.argv[1], mlflow_tracking_uri=sys.argv[2], mlflow_min_interval_seconds=0,
    mlflow_close_waits=sys.argv[3] == "1",
)
with watch(model, opt, settings=settings) as mon:
    for _ in range(5):
        opt.zero_grad()
        loss = model(torch.randn(4, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        mon.record_loss(loss)
print(mon.run_id, mon.transport.mlflow_run_id)
"""
    )
    db, uri = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'm.db'}"
    done = subprocess.run(
        [sys.executable, str(script), db, uri, "1" if close_waits else "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, known_at_close = done.stdout.split()
    client = MlflowClient(tracking_uri=uri)
    if close_waits:  # known at close, every point there before the job exited
        assert known_at_close != "None"
        history = client.get_metric_history(known_at_close, "train/loss")
        assert [m.step for m in history] == [1, 2, 3, 4]  # record_loss holds from its first call
    store = open_store(db)
    deadline = time.monotonic() + 300  # the job has exited; its host finishes MLflow
    while time.monotonic() < deadline:
        mlflow_run_id = store.run(run_id).mlflow_run_id
        if mlflow_run_id and client.get_run(mlflow_run_id).info.status == "FINISHED":
            break
        time.sleep(0.2)
    assert mlflow_run_id is not None
    assert client.get_run(mlflow_run_id).info.status == "FINISHED"
    history = client.get_metric_history(mlflow_run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    if close_waits:
        assert mlflow_run_id == known_at_close
