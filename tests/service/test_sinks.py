"""The service's sinks against the real thing: an MLflow store that is away and comes back, a
user's own MLflow run, and alert webhooks posted to a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from live_server import model_sites, step_summaries
from mlflow.tracking import MlflowClient

from monitor.measures import Event, PluginRegistry, PluginResult, RunContext, load_plugins
from monitor.report import render_report
from monitor.schema import AlertValue, IngestBatch, MeasureValue, StepSummary
from monitor.service.app import create_app
from monitor.settings import Settings
from monitor.sinks.mlflow_async import AsyncMlflowSink
from monitor.store import make_engine, upgrade
from monitor.store.store import PluginOutcome

SITES = model_sites(3, units=8)


class Alarm:
    name = "alarm"
    version = "0.1"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        if not isinstance(event, StepSummary):
            return PluginResult()
        alert = AlertValue(
            kind="test_alarm", step=event.step, message=f"odd at {event.step}", site=SITES[0].name
        )
        return PluginResult(alerts=[alert])


def registry() -> PluginRegistry:
    return PluginRegistry([Alarm(), *load_plugins(only=["entropy"]).ordered()])


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store, made once (that takes MLflow many seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    upgrade(make_engine(url))
    return url


def test_queue_depth_counts_the_metrics_of_a_send_under_way(
    tmp_path: Path, mlflow_template: Path
) -> None:
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sending = threading.Event()
    release = threading.Event()
    claimed: dict[str, str] = {}

    def resolve(run_id: str) -> str | None:
        # Called by the sink's thread at the start of each send: hold the send open here.
        sending.set()
        release.wait(timeout=60)
        return claimed.get(run_id)

    def claim(run_id: str, mlflow_id: str) -> str:
        return claimed.setdefault(run_id, mlflow_id)

    sink = AsyncMlflowSink(uri, "apmon", resolve=resolve, claim=claim)
    outcomes = []
    for step in range(30):
        outcome = PluginOutcome("train")
        outcome.measures.append(("entropy", "train", MeasureValue(name="entropy", value=step)))
        outcomes.append((step, outcome))
    try:
        sink.add_outcomes("run-1", outcomes)
        assert sending.wait(timeout=60)
        assert sink.depth == 30  # taken off the queue by the sink's thread, not yet sent
        sink.add_outcomes("run-1", outcomes[:5])
        assert sink.depth == 35
        release.set()
        assert sink.flush(timeout=120)
        assert sink.depth == 0
        history = MlflowClient(tracking_uri=uri).get_metric_history(claimed["run-1"], "ap/entropy")
        assert sorted(h.step for h in history) == sorted([*range(30), *range(5)])
    finally:
        release.set()
        sink.close()


def test_mlflow_away_then_back_gets_every_metric_once_in_batches(
    tmp_path: Path, db_url: str, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    mlflow_dir = tmp_path / "mlflow-not-yet"
    mlflow_dir.write_text("a file where the store's directory should be: MLflow cannot open it")
    mlflow_uri = f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    settings = Settings(
        database_url=db_url,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_retry_max_seconds=0.5,
        alert_cooldown_steps=40,
    )
    app = create_app(settings, registry=registry())
    services = app.state.services
    token = services.store.create_token("mirrored")
    headers = {"Authorization": f"Bearer {token}"}
    summaries = step_summaries(21, 100, SITES)
    with TestClient(app) as client:
        run = client.post(
            "/api/v1/runs",
            json={
                "name": "mirror",
                "sites": [s.model_dump() for s in SITES],
                "config": {"lr": 0.1},
            },
            headers=headers,
        ).json()
        for seq, start in enumerate(range(0, 100, 10)):
            batch = IngestBatch(seq=seq, summaries=summaries[start : start + 10])
            response = client.post(
                f"/api/v1/runs/{run['id']}/batches",
                json=batch.model_dump(mode="json"),
                headers=headers,
            )
            assert response.status_code == 200  # ingest does not wait for MLflow
        finish = client.post(
            f"/api/v1/runs/{run['id']}/finish", json={"final_step": 99}, headers=headers
        )
        assert finish.status_code == 200
        wait_for(lambda: services.mlflow.failures >= 2)  # MLflow is away: retried, not dropped
        assert services.mlflow.depth > 1000
        mlflow_dir.unlink()  # MLflow comes back
        mlflow_dir.mkdir()
        shutil.copy(mlflow_template, mlflow_dir / "mlflow.db")
        assert services.mlflow.flush(timeout=120)
        assert services.mlflow.sent_batches >= 2  # more than 1000 metrics: several log_batch calls
        metrics_text = client.get("/metrics", headers=headers).text
        assert 'apmon_sink_queue_depth{sink="mlflow"} 0.0' in metrics_text
    mlflow_run_id = services.store.run(run["id"]).mlflow_run_id
    assert mlflow_run_id
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    mirrored = mlflow.get_run(mlflow_run_id)
    assert mirrored.info.status == "FINISHED"
    assert mirrored.data.params["apmon.lr"] == "0.1"
    assert mirrored.data.tags["apmon.run_id"] == run["id"]
    tag = mirrored.data.tags["apmon.alert.test_alarm"]  # "<count> (latest step <s>: ...)"
    alarms = [a for a in services.store.alerts(run["id"]) if a.kind == "test_alarm"]
    assert tag.startswith(f"{len(alarms)} (latest step 80:")
    assert mirrored.data.metrics.pop("alerts/test_alarm") == len(alarms)  # the count, charted
    stored = services.store.measures(run["id"])
    keys = set(mirrored.data.metrics)
    expected_keys = {
        f"ap/{m.name}/{m.site.replace('#', ':')}" if m.site else f"ap/{m.name}" for m in stored
    }
    assert keys == expected_keys
    assert len(keys) == 4 * len(SITES) + 1  # few, readable keys
    site = SITES[1].name
    history = mlflow.get_metric_history(mlflow_run_id, f"ap/entropy/{site.replace('#', ':')}")
    assert sorted((h.step, h.value) for h in history) == [
        (m.step, m.value) for m in services.store.measures(run["id"], name="entropy", site=site)
    ]
    experiment = mlflow.get_experiment(mirrored.info.experiment_id)
    assert experiment.name == "apmon"
    assert len(mlflow.search_runs([experiment.experiment_id])) == 1  # one MLflow run per run
    # finish attached the report's figures before closing the MLflow run
    figures = {Path(a.path).name for a in mlflow.list_artifacts(mlflow_run_id, "apmon-report")}
    expected_figures = {f.name for f in render_report(services.store, run["id"], tmp_path / "ref")}
    assert figures == expected_figures and figures


def test_a_users_own_mlflow_run_receives_the_metrics_and_stays_open(
    tmp_path: Path, db_url: str, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    own = mlflow.create_run(mlflow.create_experiment("mine")).info.run_id
    app = create_app(
        Settings(database_url=db_url, mlflow_tracking_uri=mlflow_uri), registry=registry()
    )
    services = app.state.services
    headers = {"Authorization": f"Bearer {services.store.create_token('own')}"}
    with TestClient(app) as client:
        run = client.post(
            "/api/v1/runs",
            json={"sites": [s.model_dump() for s in SITES], "mlflow_run_id": own},
            headers=headers,
        ).json()
        batch = IngestBatch(seq=0, summaries=step_summaries(22, 2, SITES))
        client.post(
            f"/api/v1/runs/{run['id']}/batches", json=batch.model_dump(mode="json"), headers=headers
        )
        client.post(f"/api/v1/runs/{run['id']}/finish", json={"final_step": 1}, headers=headers)
        assert services.mlflow.flush(timeout=120)
    data = mlflow.get_run(own)
    assert data.info.status == "RUNNING"  # the user's run: apmon does not end it
    assert "ap/rel_entropy_mean" in data.data.metrics
    assert [h.step for h in mlflow.get_metric_history(own, "ap/rel_entropy_mean")] == [0, 1]


class Receiver(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        Receiver.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[str]:
    Receiver.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def test_alerts_reach_the_webhook_once_per_cooldown_with_a_slack_text(
    db_url: str, receiver: str
) -> None:
    settings = Settings(
        database_url=db_url, mlflow_tracking_uri="", webhook_urls=[receiver], alert_cooldown_steps=5
    )
    app = create_app(settings, registry=registry())
    services = app.state.services
    headers = {"Authorization": f"Bearer {services.store.create_token('hooked')}"}
    with TestClient(app) as client:
        run = client.post(
            "/api/v1/runs",
            json={"name": "hooked-run", "sites": [s.model_dump() for s in SITES]},
            headers=headers,
        ).json()
        batch = IngestBatch(seq=0, summaries=step_summaries(23, 12, SITES))
        response = client.post(
            f"/api/v1/runs/{run['id']}/batches", json=batch.model_dump(mode="json"), headers=headers
        )
        assert [a["step"] for a in response.json()["alerts"]] == [0, 5, 10]
        wait_for(lambda: len(Receiver.bodies) == 3, timeout=30)
    assert [b["alert"]["step"] for b in Receiver.bodies] == [0, 5, 10]
    first = Receiver.bodies[0]
    assert first["run_id"] == run["id"] and first["project"] == "hooked"
    assert (
        "test_alarm" in first["text"]
        and "hooked-run" in first["text"]
        and "step 0" in first["text"]
    )
    assert services.webhooks.delivered == 3 and services.webhooks.failed == 0
