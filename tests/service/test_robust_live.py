"""Issue 13 against a real ``apmon serve`` (2 workers) on PostgreSQL: no input jams a run, bad input
gets a 4xx that names the field (never a 5xx), out-of-order site announcements lose nothing, a
seq resent with other content is a conflict."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from live_server import LiveServer, live_server, model_sites, step_summaries
from torch import nn

from monitor.client.handle import watch
from monitor.schema import IngestBatch, StepSummary
from monitor.settings import Settings
from monitor.store import make_engine
from monitor.store.store import SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SITES = model_sites(3, units=4)
BIG = 2**63  # one past PostgreSQL's BIGINT


class Api:
    """A token's view of the live server, plus the store behind it for exact counts."""

    def __init__(self, server: LiveServer, token: str, store: SqlStore, database_url: str) -> None:
        self.http = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        self.store = store
        self.url = server.url
        self.token = token
        self.database_url = database_url

    def put_run(self, **body: Any) -> str:
        run_id = f"r-{uuid.uuid4().hex[:12]}"
        response = self.http.put(f"/api/v1/runs/{run_id}", json=body)
        assert response.status_code == 201, response.text
        return run_id

    def post(self, run_id: str, body: dict[str, Any] | bytes) -> httpx.Response:
        url = f"/api/v1/runs/{run_id}/batches"
        if isinstance(body, bytes):
            return self.http.post(url, content=body, headers={"Content-Type": "application/json"})
        return self.http.post(url, json=body)

    def finish(self, run_id: str, final_step: int) -> httpx.Response:
        return self.http.post(f"/api/v1/runs/{run_id}/finish", json={"final_step": final_step})

    def errors(self, run_id: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/api/v1/runs/{run_id}/errors")
        assert response.status_code == 200, response.text
        return list(response.json())

    def steps(self, run_id: str) -> list[int]:
        return [s.step for s in self.store.step_summaries(run_id, "train")]


@pytest.fixture(scope="module")
def api(service_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    engine = make_engine(service_pg_url)
    store = SqlStore(engine)
    token = store.create_token("robust")
    with live_server(service_pg_url, tmp_path_factory.mktemp("robust"), workers=2) as server:
        client = Api(server, token, store, service_pg_url)
        yield client
        client.http.close()
    engine.dispose()


def batch(seq: int, summaries: list[StepSummary], with_sites: bool = False) -> dict[str, Any]:
    sites = SITES if with_sites else []
    return IngestBatch(seq=seq, sites=sites, summaries=summaries).model_dump(mode="json")


def detail(response: httpx.Response) -> str:
    return json.dumps(response.json()["detail"])


def refused_at(response: httpx.Response, field: str) -> bool:
    """A 422 from the wire schema whose error is located at ``field`` (not a database message)."""
    if response.status_code != 422 or not isinstance(response.json()["detail"], list):
        return False
    return any(field in map(str, error["loc"]) for error in response.json()["detail"])


# -- 1. one bad batch never wedges a run ---------------------------------------------------------


def test_the_reported_poisoned_batch_is_refused_and_the_run_goes_on(api: Api) -> None:
    run_id = api.put_run()  # PUT {}: no sites
    summaries = step_summaries(1, 2, SITES)
    poisoned = batch(1, summaries[1:], with_sites=True)
    poisoned["summaries"][0]["step"] = BIG
    refused = api.post(run_id, poisoned)
    assert refused_at(refused, "step"), refused.text
    assert api.post(run_id, batch(0, summaries[:1], with_sites=True)).status_code == 200
    assert api.post(run_id, batch(1, summaries[1:])).status_code == 200
    done = api.finish(run_id, 1)
    assert done.status_code == 200 and done.json()["status"] == "finished"
    assert api.steps(run_id) == [0, 1]
    assert api.errors(run_id) == []


def test_a_waiting_batch_that_cannot_be_processed_is_quarantined_and_listed(api: Api) -> None:
    run_id = api.put_run(sites=[s.model_dump() for s in SITES])
    summaries = step_summaries(2, 3, SITES)
    ghost = batch(1, summaries[1:2])
    ghost["summaries"][0]["sites"][0]["site"] = "ghost#0"  # announced by nobody, ever
    waiting = api.post(run_id, ghost)
    assert waiting.status_code == 200 and waiting.json()["pending_batches"] == 1
    first = api.post(run_id, batch(0, summaries[:1]))
    assert first.status_code == 200, first.text
    assert first.json()["pending_batches"] == 0
    third = api.post(run_id, batch(2, summaries[2:]))
    assert third.status_code == 200 and third.json()["processed_batches"] == 1
    assert api.steps(run_id) == [0, 2]
    errors = api.errors(run_id)
    assert [(e["source"], e["step"]) for e in errors] == [("apmon.ingest", 1)]
    assert "main/1" in errors[0]["error"] and "ghost#0" in errors[0]["error"]
    assert api.store.quarantined_batches(run_id)[0][:2] == ("main", 1)
    listed = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "errors", run_id],
        env={**os.environ, "APMON_DATABASE_URL": api.database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 1, listed.stderr
    assert "apmon.ingest" in listed.stdout and "quarantined batch main/1" in listed.stdout
    assert api.finish(run_id, 2).json()["status"] == "finished"
    # A retry of the quarantined batch is a duplicate, not a new chance to jam the run.
    assert api.post(run_id, ghost).json()["duplicate"] is True


# -- 2. bad input gets a 4xx that names the field; nothing is stored ----------------------------


@pytest.mark.parametrize(
    ("where", "value", "field"),
    [
        ("seq", BIG, "seq"),
        ("seq", 10**30, "seq"),
        ("step", BIG, "step"),
        ("rows", BIG, "rows"),
        ("unit_on", BIG, "unit_on"),
        ("site", "net.0\x00#0", "site"),
        ("stream", "ma\x00in", "stream"),
        ("sites", "net.9\x00#0", "name"),
        ("count", -3, "patterns"),
    ],
)
def test_out_of_range_integers_and_nul_get_422_naming_the_field(
    api: Api, where: str, value: Any, field: str
) -> None:
    run_id = api.put_run(sites=[s.model_dump() for s in SITES])
    body = batch(0, step_summaries(3, 1, SITES))
    site = body["summaries"][0]["sites"][0]
    if where in ("seq", "stream"):
        body[where] = value
    elif where == "step":
        body["summaries"][0]["step"] = value
    elif where == "sites":
        body["sites"] = [{"name": value, "kind": "dense", "units": 4}]
    elif where == "unit_on":
        site["unit_on"][0] = value
    elif where == "count":
        site["patterns"], site["patterns_exact"] = [[5, value]], False
    else:
        site[where] = value
    response = api.post(run_id, body)
    assert refused_at(response, field), response.text
    assert api.steps(run_id) == [] and api.errors(run_id) == []
    # The seq is still free: the good batch goes through.
    assert api.post(run_id, batch(0, step_summaries(3, 1, SITES))).status_code == 200


# -- 3. a NUL in the run name is refused at watch(), before training ----------------------------


def test_a_nul_in_the_run_name_is_refused_at_watch_and_by_the_service(
    api: Api, tmp_path: Path
) -> None:
    settings = Settings(server_url=api.url, token=api.token, spool_dir=str(tmp_path / "spool"))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runs_before = len(api.store.runs("robust"))
    with pytest.raises(ValueError, match="name") as caught:
        watch(model, optimizer, settings=settings, name="exp\x00 1")
    assert "NUL" in str(caught.value)
    put = api.http.put("/api/v1/runs/nul-name", json={"name": "exp\x00 1"})
    assert refused_at(put, "name"), put.text
    assert len(api.store.runs("robust")) == runs_before


# -- 6. a batch that arrives before its sites waits ----------------------------------------------


def test_a_batch_before_the_one_announcing_its_sites_waits_and_nothing_is_rejected(
    api: Api,
) -> None:
    run_id = api.put_run()
    summaries = step_summaries(4, 4, SITES)
    early = api.post(run_id, batch(1, summaries[2:]))  # its sites come with seq 0
    assert early.status_code == 200, early.text
    assert early.json()["pending_batches"] == 1
    assert api.post(run_id, batch(0, summaries[:2], with_sites=True)).status_code == 200
    assert api.steps(run_id) == [0, 1, 2, 3]
    assert api.finish(run_id, 3).json()["status"] == "finished"
    assert api.errors(run_id) == []


def test_concurrent_shuffled_replays_reject_nothing_and_store_every_step_once(api: Api) -> None:
    clients, steps = 8, 12
    runs = {api.put_run(): step_summaries(50 + i, steps, SITES) for i in range(clients)}
    codes: list[int] = []
    lock = threading.Lock()

    def replay(run_id: str, summaries: list[StepSummary], seed: int) -> None:
        rng = random.Random(seed)
        parts = [batch(i, summaries[i * 2 : i * 2 + 2], with_sites=i == 0) for i in range(6)]
        order = list(range(6))
        rng.shuffle(order)
        order += rng.sample(order, 3)
        with httpx.Client(base_url=api.url, headers=dict(api.http.headers), timeout=60) as http:
            for i in order:
                code = http.post(f"/api/v1/runs/{run_id}/batches", json=parts[i]).status_code
                with lock:
                    codes.append(code)

    threads = [
        threading.Thread(target=replay, args=(run_id, summaries, n))
        for n, (run_id, summaries) in enumerate(runs.items())
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert codes == [200] * (clients * 9)
    for run_id, summaries in runs.items():
        assert list(api.store.step_summaries(run_id, "train")) == summaries
        assert api.errors(run_id) == []


# -- 7. the smaller ones ---------------------------------------------------------------------


def test_class_statistics_and_config_are_bounded(api: Api) -> None:
    run_id = api.put_run(sites=[s.model_dump() for s in SITES])
    body = batch(0, step_summaries(5, 1, SITES))
    site = body["summaries"][0]["sites"][0]
    site["class_unit_on"] = {str(i): [0] * 4 for i in range(200_000)}
    response = api.post(run_id, body)
    assert refused_at(response, "class_unit_on"), response.text[:300]
    config = {f"k{i}": i for i in range(100_000)}
    response = api.http.put("/api/v1/runs/big-config", json={"config": config})
    assert refused_at(response, "config"), response.text[:300]
    too_big = api.http.put("/api/v1/runs/big-int", json={"config": {"n": BIG}})
    assert refused_at(too_big, "config"), too_big.text


def test_an_oversized_chunked_body_gets_413_and_deep_nesting_a_clear_422(api: Api) -> None:
    run_id = api.put_run()

    def chunks() -> Iterator[bytes]:
        yield b'{"seq": 0, "pad": "'
        for _ in range(10):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    response = api.http.post(
        f"/api/v1/runs/{run_id}/batches",
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413 and "larger" in response.json()["detail"]
    deep = b'{"seq": 0, "summaries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = api.post(run_id, deep)
    assert response.status_code == 422 and "nested" in response.json()["detail"]
    response = api.post(run_id, b'{"seq": 0, "stream": "\xff"}')
    assert response.status_code == 422 and "UTF-8" in response.json()["detail"]


def test_a_seq_resent_with_other_content_is_a_409_conflict(api: Api) -> None:
    run_id = api.put_run(sites=[s.model_dump() for s in SITES])
    summaries = step_summaries(6, 2, SITES)
    assert api.post(run_id, batch(0, summaries[:1])).status_code == 200
    assert api.post(run_id, batch(0, summaries[:1])).json()["duplicate"] is True
    other = api.post(run_id, batch(0, summaries[1:]))
    assert other.status_code == 409 and "other content" in other.json()["detail"]
    assert api.steps(run_id) == [0]


def test_concurrent_puts_of_one_run_create_it_once(api: Api) -> None:
    run_id = f"race-{uuid.uuid4().hex[:8]}"
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def put() -> None:
        with httpx.Client(base_url=api.url, headers=dict(api.http.headers), timeout=30) as http:
            barrier.wait()
            codes.append(http.put(f"/api/v1/runs/{run_id}", json={"name": "race"}).status_code)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(codes) == [200] * 7 + [201]
    assert [r.id for r in api.store.runs("robust")].count(run_id) == 1


def test_a_nul_in_a_query_filter_is_a_422(api: Api) -> None:
    run_id = api.put_run()
    for param in ("name", "site"):
        response = api.http.get(f"/api/v1/runs/{run_id}/measures", params={param: "a\x00b"})
        assert refused_at(response, param), response.text


def test_docs_are_public_and_data_is_not(api: Api) -> None:
    # The API's description is public (README: "Authentication"); every data route is not.
    assert httpx.get(f"{api.url}/openapi.json").status_code == 200
    assert httpx.get(f"{api.url}/docs").status_code == 200
    assert httpx.get(f"{api.url}/api/v1/runs").status_code == 401
    assert httpx.get(f"{api.url}/metrics").status_code == 401
