"""The embedded host's MLflow process: points, alerts and reports reach a real MLflow store, and
the host itself never imports MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from monitor.schema import AlertValue, MeasureValue
from monitor.sinks import mlflow_process
from monitor.sinks.mlflow_process import MirrorFailed, MlflowMirror
from monitor.store.store import PluginOutcome


def outcome(step: int, alert: bool = False) -> PluginOutcome:
    result = PluginOutcome("train")
    result.measures = [
        ("entropy", "1", MeasureValue(name="entropy_mean", value=step / 10)),
        ("entropy", "1", MeasureValue(name="entropy", value=1.0, site="fc#0")),
    ]
    if alert:
        result.alerts = [("strikes", AlertValue(kind="bad_batch", step=step, message="odd batch"))]
    return result


def test_points_alerts_and_files_reach_mlflow_through_the_mirror(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mirror = MlflowMirror(keys="summary")
    for step in range(5):  # before MLflow is open: collected, then sent once it is
        if step == 3:
            mirror.open(
                {"tracking_uri": uri, "experiment": "mirror", "run_name": "r"},
                {"apmon.every": 1},
                "apmon-run-1",
            )
        mirror("apmon-run-1", step, outcome(step, alert=step == 1))
        mirror.log_metric("train/loss", 1.0 / (step + 1), step)
    mirror.flush(wait=True)
    assert mirror.run_id is not None and mirror._process is not None
    if hasattr(os, "SCHED_IDLE"):  # MLflow only gets CPU that training leaves idle
        assert os.sched_getscheduler(mirror._process.pid) == os.SCHED_IDLE
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(mirror.run_id, "ap/entropy_mean")
    assert [(m.step, m.value) for m in history] == [(s, s / 10) for s in range(5)]
    run = client.get_run(mirror.run_id)
    assert "ap/entropy/fc:0" not in run.data.metrics  # "summary" keys: no per-site keys
    assert run.data.tags["apmon.alert.bad_batch"] == "1 (latest step 1: odd batch)"
    assert run.data.tags["apmon.run_id"] == "apmon-run-1"
    assert run.data.params["apmon.every"] == "1"
    report = tmp_path / "report.html"
    report.write_text("<p>report</p>")
    mirror.attach([report])
    mirror.close()
    assert mirror.failures == 0 and mirror.thinned_points == 0
    assert mirror._process is not None and mirror._process.returncode == 0
    run = client.get_run(mirror.run_id)
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(mirror.run_id, "apmon-report")] == [
        "apmon-report/report.html"
    ]


def test_points_waiting_for_mlflow_are_bounded_by_thinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mlflow_process, "MAX_WAITING_POINTS", 10)
    mirror = MlflowMirror(keys="all")
    for step in range(100):
        mirror.log_metric("train/loss", float(step), step)
    kept = [point[3] for point in mirror._waiting]
    assert len(kept) <= 10 and mirror.thinned_points == 100 - len(kept)
    assert kept == sorted(kept) and kept[0] == 0  # every other point of the whole run, in order
    assert kept[-1] >= 90


def test_a_store_mlflow_cannot_open_fails_the_mirror_and_ends_its_process() -> None:
    mirror = MlflowMirror()
    sink_arguments = {"tracking_uri": "bogus://nowhere", "experiment": "x", "run_name": ""}
    with pytest.raises(MirrorFailed, match="bogus"):
        mirror.open(sink_arguments, {}, "")
    assert mirror._process is not None and mirror._process.returncode is not None
    mirror("run", 1, outcome(1, alert=True))  # a failed mirror takes calls and does nothing
    mirror.flush(wait=True)
    mirror.close()
    assert mirror._waiting == [] and not mirror.is_open


def test_the_host_process_never_imports_mlflow() -> None:
    code = (
        "import sys, monitor.host_process, monitor.sinks.mlflow_process;"
        "print('mlflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
