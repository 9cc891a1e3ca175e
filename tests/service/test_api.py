"""The REST API in-process on a real SQLite file: auth, lifecycle, validation, idempotency."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from live_server import embedded_measures, model_sites, step_summaries

from monitor.measures import Event, PluginRegistry, PluginResult, RunContext, load_plugins
from monitor.schema import AlertValue, IngestBatch, StepSummary
from monitor.service.app import create_app
from monitor.settings import Settings
from monitor.store import make_engine, upgrade

SITES = model_sites(3, units=8)


class Service:
    def __init__(self, client: TestClient, tokens: dict[str, str]) -> None:
        self.client = client
        self.tokens = tokens

    def headers(self, project: str = "alpha") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[project]}"}

    def start(self, project: str = "alpha", **body: Any) -> str:
        body.setdefault("sites", [s.model_dump() for s in SITES])
        response = self.client.post("/api/v1/runs", json=body, headers=self.headers(project))
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def ingest(self, run_id: str, batch: IngestBatch | dict[str, Any], project: str = "alpha"):
        body = batch.model_dump(mode="json") if isinstance(batch, IngestBatch) else batch
        return self.client.post(
            f"/api/v1/runs/{run_id}/batches", json=body, headers=self.headers(project)
        )

    def measures(self, run_id: str, **params: Any) -> list[dict[str, Any]]:
        response = self.client.get(
            f"/api/v1/runs/{run_id}/measures", params=params, headers=self.headers()
        )
        assert response.status_code == 200, response.text
        return list(response.json())


def make_service(tmp_path: Path, registry: PluginRegistry | None = None, **settings: Any):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    upgrade(make_engine(url))
    app = create_app(
        Settings(database_url=url, mlflow_tracking_uri="", **settings), registry=registry
    )
    store = app.state.services.store
    tokens = {p: store.create_token(p) for p in ("alpha", "beta")}
    return app, tokens


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[Service]:
    app, tokens = make_service(tmp_path)
    with TestClient(app) as client:
        yield Service(client, tokens)


def batches(summaries: list[StepSummary], per_batch: int) -> list[IngestBatch]:
    return [
        IngestBatch(seq=i, summaries=summaries[start : start + per_batch])
        for i, start in enumerate(range(0, len(summaries), per_batch))
    ]


def stored(service: Service, run_id: str) -> dict[tuple[int, str, str | None, str], float]:
    return {
        (m["step"], m["name"], m["site"], m["source"]): m["value"] for m in service.measures(run_id)
    }


# -- health and auth ------------------------------------------------------------------------


def test_health_needs_no_token_and_readiness_checks_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    app = create_app(Settings(database_url=url, mlflow_tracking_uri=""), check_schema=False)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "apmon db upgrade" in response.json()["detail"]
        upgrade(make_engine(url))
        assert client.get("/readyz").status_code == 200


def test_every_api_route_needs_a_valid_token(service: Service) -> None:
    run_id = service.start()
    routes = [
        ("GET", "/api/v1/runs"),
        ("GET", f"/api/v1/runs/{run_id}"),
        ("GET", f"/api/v1/runs/{run_id}/measures"),
        ("GET", f"/api/v1/runs/{run_id}/alerts"),
        ("GET", "/api/v1/plugins"),
        ("GET", "/metrics"),
        ("POST", f"/api/v1/runs/{run_id}/batches"),
    ]
    for method, path in routes:
        missing = service.client.request(method, path, json={"seq": 0})
        assert missing.status_code == 401, path
        assert "missing API token" in missing.json()["detail"]
        bad = service.client.request(
            method, path, json={"seq": 0}, headers={"Authorization": "Bearer apm_nope"}
        )
        assert bad.status_code == 401, path
        assert "invalid" in bad.json()["detail"]


def test_another_projects_token_sees_404_and_writes_nothing(service: Service) -> None:
    run_id = service.start("alpha")
    summaries = step_summaries(1, 2, SITES)
    for path in ("", "/measures", "/probes", "/fits", "/alerts", "/sites", "/errors"):
        response = service.client.get(
            f"/api/v1/runs/{run_id}{path}", headers=service.headers("beta")
        )
        assert response.status_code == 404, path
    response = service.ingest(run_id, IngestBatch(seq=0, summaries=summaries), project="beta")
    assert response.status_code == 404
    finish = service.client.post(
        f"/api/v1/runs/{run_id}/finish", json={"final_step": 1}, headers=service.headers("beta")
    )
    assert finish.status_code == 404
    taken = service.client.put(
        f"/api/v1/runs/{run_id}", json={"name": "mine"}, headers=service.headers("beta")
    )
    assert taken.status_code == 404
    assert service.measures(run_id) == []
    listed = service.client.get("/api/v1/runs", headers=service.headers("beta")).json()
    assert listed == []
    # The owner writes fine afterwards: nothing of the refused batch was kept.
    assert (
        service.ingest(run_id, IngestBatch(seq=0, summaries=summaries)).json()["duplicate"] is False
    )


# -- ingest ---------------------------------------------------------------------------------


def test_ingest_matches_embedded_mode_and_duplicates_are_stored_once(
    service: Service, tmp_path: Path
) -> None:
    run_id = service.start()
    summaries = step_summaries(2, 6, SITES)
    for batch in batches(summaries, 2):
        first = service.ingest(run_id, batch)
        assert first.status_code == 200 and first.json()["duplicate"] is False
        again = service.ingest(run_id, batch)
        assert again.status_code == 200 and again.json()["duplicate"] is True
    expected = embedded_measures(tmp_path, SITES, summaries, final_step=None)
    got = stored(service, run_id)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), key
    assert len(service.measures(run_id)) == len(expected)  # no row twice


class StepRecorder:
    """A plugin that remembers the order it saw steps in (in its persisted state)."""

    name = "step_recorder"
    version = "1"
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
        seen = state.setdefault("seen", [])
        previous = seen[-1] if seen else -1
        seen.append(event.step)
        from monitor.schema import MeasureValue

        return PluginResult(
            measures=[MeasureValue(name="in_order", value=float(event.step > previous))]
        )


def test_out_of_order_batches_wait_and_plugins_see_steps_in_order(tmp_path: Path) -> None:
    registry = PluginRegistry([StepRecorder()])
    app, tokens = make_service(tmp_path, registry=registry)
    with TestClient(app) as client:
        service = Service(client, tokens)
        run_id = service.start()
        parts = batches(step_summaries(3, 8, SITES), 2)
        order = [2, 3, 1, 0]
        pending = []
        for index in order:
            response = service.ingest(run_id, parts[index]).json()
            pending.append((response["processed_batches"], response["pending_batches"]))
        assert pending == [(0, 1), (0, 2), (0, 3), (4, 0)]
        values = service.measures(run_id, name="in_order")
        assert [m["step"] for m in values] == list(range(8))
        assert all(m["value"] == 1.0 for m in values)


def test_bad_input_gets_a_clear_4xx_and_stores_nothing(service: Service) -> None:
    run_id = service.start()
    good = IngestBatch(seq=0, summaries=step_summaries(4, 1, SITES)).model_dump(mode="json")
    url = f"/api/v1/runs/{run_id}/batches"
    h = service.headers()

    def post_raw(body: bytes) -> Any:
        return service.client.post(
            url, content=body, headers={**h, "Content-Type": "application/json"}
        )

    wrong_type = json.loads(json.dumps(good))
    wrong_type["summaries"][0]["step"] = "seven"
    r = service.ingest(run_id, wrong_type)
    assert r.status_code == 422 and "step" in json.dumps(r.json()["detail"])

    with_nan = json.dumps(good).replace('"loss": 1.0', '"loss": NaN').encode()
    assert b"NaN" in with_nan
    r = post_raw(with_nan)
    assert r.status_code == 422 and "finite" in json.dumps(r.json()["detail"]).lower()

    r = post_raw(b'{"seq": 0, "summaries": [')
    assert r.status_code == 422 and "JSON" in json.dumps(r.json()["detail"])

    r = service.client.post("/api/v1/runs/no-such-run/batches", json=good, headers=h)
    assert r.status_code == 404 and "no-such-run" in r.json()["detail"]

    unknown_site = json.loads(json.dumps(good))
    unknown_site["summaries"][0]["sites"][0]["site"] = "ghost#0"
    r = service.ingest(run_id, unknown_site)
    assert r.status_code == 422 and "ghost#0" in r.json()["detail"]

    inconsistent = json.loads(json.dumps(good))
    inconsistent["summaries"][0]["sites"][0]["rows"] += 1
    r = service.ingest(run_id, inconsistent)
    assert r.status_code == 422 and "spectrum" in json.dumps(r.json()["detail"])

    too_big = post_raw(b'{"seq": 0, "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}')
    assert too_big.status_code == 413 and "larger" in too_big.json()["detail"]

    assert service.measures(run_id) == []
    # The same seq is still free: none of the refused bodies claimed it.
    assert service.ingest(run_id, good).json()["duplicate"] is False


def test_repeating_a_stored_step_in_a_new_batch_is_refused(service: Service) -> None:
    run_id = service.start()
    summaries = step_summaries(5, 1, SITES)
    assert service.ingest(run_id, IngestBatch(seq=0, summaries=summaries)).status_code == 200
    repeat = service.ingest(run_id, IngestBatch(seq=1, summaries=summaries))
    assert repeat.status_code == 422 and "cannot be stored" in repeat.json()["detail"]
    assert len(service.measures(run_id, name="entropy")) == len(SITES)


def test_finished_run_takes_no_more_batches_and_finish_is_idempotent(service: Service) -> None:
    run_id = service.start()
    summaries = step_summaries(6, 3, SITES)
    assert service.ingest(run_id, IngestBatch(seq=0, summaries=summaries[:2])).status_code == 200
    # seq 2 arrives, seq 1 never does: finish still processes it.
    assert (
        service.ingest(run_id, IngestBatch(seq=2, summaries=summaries[2:])).json()[
            "pending_batches"
        ]
        == 1
    )
    url = f"/api/v1/runs/{run_id}/finish"
    done = service.client.post(url, json={"final_step": 2}, headers=service.headers())
    assert done.status_code == 200 and done.json()["status"] == "finished"
    assert sorted({m["step"] for m in service.measures(run_id)}) == [0, 1, 2]
    again = service.client.post(url, json={"final_step": 2}, headers=service.headers())
    assert again.status_code == 200
    late = service.ingest(run_id, IngestBatch(seq=3, summaries=[]))
    assert late.status_code == 409 and "finished" in late.json()["detail"]
    # A retry of a batch it already has is still just a duplicate.
    assert service.ingest(run_id, IngestBatch(seq=0, summaries=summaries[:2])).json()["duplicate"]


def test_put_run_is_idempotent_with_a_client_chosen_id(service: Service) -> None:
    url = "/api/v1/runs/client-chosen-1"
    first = service.client.put(url, json={"name": "a"}, headers=service.headers())
    second = service.client.put(url, json={"name": "a"}, headers=service.headers())
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"] == "client-chosen-1"
    runs = service.client.get("/api/v1/runs", headers=service.headers()).json()
    assert [r["id"] for r in runs] == ["client-chosen-1"]


def test_queries_filter_by_name_site_and_step_range(service: Service) -> None:
    run_id = service.start()
    summaries = step_summaries(7, 5, SITES)
    for batch in batches(summaries, 5):
        service.ingest(run_id, batch)
    site = SITES[1].name
    got = service.measures(run_id, name="entropy", site=site, step_min=1, step_max=3)
    assert [(m["step"], m["site"], m["name"]) for m in got] == [
        (s, site, "entropy") for s in (1, 2, 3)
    ]
    sites = service.client.get(f"/api/v1/runs/{run_id}/sites", headers=service.headers()).json()
    assert [s["name"] for s in sites["sites"]] == [s.name for s in SITES]


# -- plugins, alerts, metrics ---------------------------------------------------------------


class Exploder:
    name = "exploder"
    version = "0.1"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        raise RuntimeError("boom")


class Alarm:
    """Alerts on every step summary; the host's cool-down must keep most of them out."""

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
        return PluginResult(
            alerts=[AlertValue(kind="test_alarm", step=event.step, message=f"step {event.step}")]
        )


def test_failing_plugin_is_recorded_and_skipped_and_alerts_are_deduplicated(tmp_path: Path) -> None:
    registry = PluginRegistry([Exploder(), Alarm(), *load_plugins(only=["entropy"]).ordered()])
    app, tokens = make_service(tmp_path, registry=registry, alert_cooldown_steps=3)
    with TestClient(app) as client:
        service = Service(client, tokens)
        run_id = service.start()
        listed = client.get("/api/v1/plugins", headers=service.headers()).json()
        assert {(p["name"], p["version"]) for p in listed} == {
            ("exploder", "0.1"),
            ("alarm", "0.1"),
            ("entropy", "1.0"),
        }
        summaries = step_summaries(8, 7, SITES)
        raised = []
        for batch in batches(summaries, 1):
            response = service.ingest(run_id, batch)
            assert response.status_code == 200
            raised += [a["step"] for a in response.json()["alerts"]]
        assert raised == [0, 3, 6]  # cool-down of 3 steps
        stored_alerts = client.get(
            f"/api/v1/runs/{run_id}/alerts", headers=service.headers()
        ).json()
        assert [a["step"] for a in stored_alerts] == [0, 3, 6]
        newer = client.get(
            f"/api/v1/runs/{run_id}/alerts",
            params={"after_id": stored_alerts[0]["id"]},
            headers=service.headers(),
        ).json()
        assert [a["step"] for a in newer] == [3, 6]
        errors = client.get(f"/api/v1/runs/{run_id}/errors", headers=service.headers()).json()
        assert [e["step"] for e in errors] == list(range(7))
        assert all(e["source"] == "exploder" and "boom" in e["error"] for e in errors)
        assert len(service.measures(run_id, name="entropy")) == 7 * len(SITES)
        metrics = client.get("/metrics", headers=service.headers()).text
        assert 'apmon_plugin_errors_total{plugin="exploder"} 7.0' in metrics
        assert f"apmon_ingested_site_summaries_total {7 * len(SITES)}.0" in metrics
        assert 'apmon_ingest_batches_total{result="stored"} 7.0' in metrics
        assert "apmon_pending_batches 0" in metrics
        assert "apmon_ingest_latency_seconds_count 7.0" in metrics
