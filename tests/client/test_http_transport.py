"""HttpTransport against a real service: spooling while the service is away, delivery once when it
returns, pick-up of a dead process's spool, alerts back to the training loop, and watch()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from live_server import free_port, live_server, model_sites, step_summaries

from monitor.client.handle import watch
from monitor.client.http import HttpTransport
from monitor.measures import Event, PluginRegistry, PluginResult, RunContext
from monitor.schema import AlertValue, RunStart, StepSummary
from monitor.service.app import create_app
from monitor.settings import Settings
from monitor.store import make_engine, upgrade
from monitor.store.store import SqlStore

SITES = model_sites(4, units=8)
REPO = Path(__file__).resolve().parents[2]


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def migrated_sqlite(tmp_path: Path) -> tuple[str, SqlStore]:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    engine = make_engine(url)
    upgrade(engine)
    return url, SqlStore(engine)


def client_settings(port: int, token: str, tmp_path: Path, **extra: Any) -> Settings:
    options: dict[str, Any] = {
        "batch_max_records": 3,
        "batch_max_seconds": 0.2,
        "request_timeout_seconds": 5,
        "finish_timeout_seconds": 60,
        **extra,
    }
    return Settings(
        server_url=f"http://127.0.0.1:{port}",
        token=token,
        spool_dir=str(tmp_path / "spool"),
        **options,
    )


def test_records_wait_on_disk_while_the_service_is_away_and_arrive_once(tmp_path: Path) -> None:
    url, store = migrated_sqlite(tmp_path)
    token = store.create_token("spooled")
    port = free_port()
    transport = HttpTransport(client_settings(port, token, tmp_path))
    run_id = transport.start_run(RunStart(name="away"))
    transport.add_sites(SITES)
    summaries = step_summaries(11, 10, SITES)
    for summary in summaries:
        transport.send_summary(summary)
    spool = tmp_path / "spool" / run_id
    # Nothing listens on the port: every batch is on disk, none is lost.
    wait_for(lambda: len(list(spool.glob("0*.json"))) == 4)  # 3 + 3 + 3 + 1 records
    assert (spool / "start.json").exists()
    with live_server(url, tmp_path, workers=1, port=port):
        transport.finish(len(summaries) - 1)
    assert transport.done.is_set()
    assert not spool.exists()
    run = store.run(run_id)
    assert run.status == "finished" and run.project == "spooled"
    assert list(store.step_summaries(run_id, "train")) == summaries  # each step exactly once
    assert transport.rejected == 0


def test_a_dead_process_spool_is_delivered_by_the_next_transport(tmp_path: Path) -> None:
    url, store = migrated_sqlite(tmp_path)
    token = store.create_token("orphans")
    port = free_port()
    spool_dir = tmp_path / "spool"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO / "tests" / "service")!r})
        from live_server import model_sites, step_summaries
        from monitor.client.http import HttpTransport
        from monitor.schema import RunStart
        from monitor.settings import Settings
        settings = Settings(server_url="http://127.0.0.1:{port}", token={token!r},
                            spool_dir={str(spool_dir)!r}, batch_max_records=2,
                            batch_max_seconds=0.1)
        t = HttpTransport(settings)
        run_id = t.start_run(RunStart(name="dies"))
        sites = model_sites(4, units=8)
        t.add_sites(sites)
        for s in step_summaries(12, 4, sites):
            t.send_summary(s)
        spool = settings.spool_dir + "/" + run_id
        for _ in range(400):
            if len([f for f in os.listdir(spool) if f.startswith("0")]) == 2:
                break
            time.sleep(0.05)
        print(run_id, flush=True)
        os._exit(0)  # dies without finishing
        """
    )
    dead = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert dead.returncode == 0, dead.stderr
    dead_run = dead.stdout.strip()
    assert len(list((spool_dir / dead_run).glob("0*.json"))) == 2
    with live_server(url, tmp_path, workers=1, port=port):
        transport = HttpTransport(client_settings(port, token, tmp_path))
        transport.start_run(RunStart(name="next"))
        transport.finish(0)
    assert [s.step for s in store.step_summaries(dead_run, "train")] == [0, 1, 2, 3]
    assert store.run(dead_run).status == "running"  # it never finished; its data is all there
    assert not (spool_dir / dead_run).exists()


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
        if isinstance(event, StepSummary) and event.step == 2:
            return PluginResult(alerts=[AlertValue(kind="test_alarm", step=2, message="stop")])
        return PluginResult()


def test_alerts_from_ingest_responses_reach_on_alert_through_watch(tmp_path: Path) -> None:
    url, store = migrated_sqlite(tmp_path)
    app = create_app(
        Settings(database_url=url, mlflow_tracking_uri=""), registry=PluginRegistry([Alarm()])
    )
    token = store.create_token("watched")
    settings = client_settings(1, token, tmp_path, batch_max_records=1)
    seen: list[AlertValue] = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TestClient(app, base_url=settings.server_url or "") as http:
        http.headers["Authorization"] = f"Bearer {token}"
        transport = HttpTransport(settings, client=http)
        # capture_budget=None: every step's site summaries are stored (checked below)
        with watch(
            model, optimizer, transport=transport, on_alert=seen.append, capture_budget=None
        ) as monitor:
            steps = 0
            while not seen and steps < 100:  # train until the alert reaches the loop
                loss = model(torch.randn(16, 4)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
                time.sleep(0.05)
        run_id = monitor.run_id
        assert [(a.kind, a.step) for a in seen] == [("test_alarm", 2)]
        assert [(a.kind, a.step) for a in monitor.alerts] == [("test_alarm", 2)]
        assert 3 <= steps < 100
        stored_steps = [s.step for s in store.step_summaries(run_id, "train")]
        assert stored_steps == list(range(steps))
        assert store.run(run_id).status == "finished"


def test_watch_with_a_server_url_ships_to_the_service(tmp_path: Path) -> None:
    url, store = migrated_sqlite(tmp_path)
    token = store.create_token("shipped")
    port = free_port()
    with live_server(url, tmp_path, workers=1, port=port) as server:
        settings = client_settings(port, token, tmp_path)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        # capture_budget=None: patterns (and their distinct counts) on every step
        with watch(model, optimizer, settings=settings, capture_budget=None) as monitor:
            for _ in range(5):
                loss = model(torch.randn(16, 4)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        response = httpx.get(
            f"{server.url}/api/v1/runs/{monitor.run_id}/measures",
            params={"name": "distinct"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200
        # One ReLU site, steps 0..4: distinct patterns per step, as the embedded path stores.
        assert sorted({m["step"] for m in response.json()}) == list(range(5))
        for summary in store.step_summaries(monitor.run_id, "train"):
            by_step = [m for m in response.json() if m["step"] == summary.step]
            assert [m["value"] for m in by_step] == [float(s.distinct) for s in summary.sites]


def test_a_service_refusal_is_kept_aside_not_resent(tmp_path: Path) -> None:
    url, store = migrated_sqlite(tmp_path)
    token = store.create_token("refused")
    port = free_port()
    with live_server(url, tmp_path, workers=1, port=port):
        transport = HttpTransport(client_settings(port, token, tmp_path))
        run_id = transport.start_run(RunStart(name="bad"))
        # A summary naming a site nobody announced: the service answers 422.
        transport.send_summary(step_summaries(13, 1, SITES)[0])
        transport.finish(0)
    rejected = tmp_path / "spool" / run_id / "rejected"
    assert [p.name for p in rejected.iterdir()] == ["000000000000.json"]
    assert transport.rejected == 1
    assert list(store.step_summaries(run_id, "train")) == []
    assert store.run(run_id).status == "finished"


@pytest.fixture(autouse=True)
def _no_env_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APMON_SERVER_URL", raising=False)


def test_a_quiet_run_sends_heartbeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import text

    import monitor.client.http as http_module

    url, store = migrated_sqlite(tmp_path)
    app = create_app(Settings(database_url=url, mlflow_tracking_uri=""))
    token = store.create_token("quiet")
    settings = client_settings(1, token, tmp_path)
    monkeypatch.setattr(http_module, "HEARTBEAT_SECONDS", 0.1)
    engine = make_engine(url)

    def last_heartbeat(run_id: str) -> Any:
        with engine.connect() as connection:
            query = text("select heartbeat_at from runs where id = :id")
            return connection.execute(query, {"id": run_id}).scalar()

    with TestClient(app, base_url=settings.server_url or "") as http:
        http.headers["Authorization"] = f"Bearer {token}"
        transport = HttpTransport(settings, client=http)
        run_id = transport.start_run(RunStart(name="quiet"))
        # Nothing but the heartbeat endpoint ever sets heartbeat_at.
        wait_for(lambda: store.runs("quiet") != [] and last_heartbeat(run_id) is not None)
        transport.finish(0)
    assert store.run(run_id).status == "finished"
