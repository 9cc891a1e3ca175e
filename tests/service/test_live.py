"""A real ``apmon serve`` with 2 uvicorn workers on PostgreSQL: concurrent clients, duplicated and
reordered batches, and a worker killed mid-ingest; every step is stored exactly once and the
measures equal embedded mode's for the same summaries."""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import embedded_measures, live_server, model_sites, step_summaries

from monitor.schema import IngestBatch, RunStart, StepSummary
from monitor.store import make_engine
from monitor.store.store import SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SITES = model_sites(20, units=16)
RUNS = 4
STEPS = 18
PER_BATCH = 3


def send(client: httpx.Client, method: str, url: str, body: dict) -> httpx.Response:
    """Retry through dead workers and restarts (bounded): what any real client does."""
    for _attempt in range(60):
        try:
            response = client.request(method, url, json=body)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if response.status_code < 500:
            return response
        time.sleep(0.2)
    raise AssertionError(f"{method} {url} never succeeded")


def test_two_workers_concurrent_duplicates_reordering_and_a_killed_worker(
    service_pg_url: str, tmp_path: Path
) -> None:
    engine = make_engine(service_pg_url)
    store = SqlStore(engine)
    token = store.create_token("live")
    other = store.create_token("elsewhere")
    with live_server(service_pg_url, tmp_path, workers=2) as server:
        headers = {"Authorization": f"Bearer {token}"}
        runs: dict[str, list[StepSummary]] = {}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            for index in range(RUNS):
                start = RunStart(name=f"live-{index}", sites=SITES).model_dump(mode="json")
                response = send(client, "POST", "/api/v1/runs", start)
                assert response.status_code == 201, response.text
                runs[response.json()["id"]] = step_summaries(100 + index, STEPS, SITES)
            # Another project's token cannot read these runs while they are written.
            foreign = client.get(
                f"/api/v1/runs/{next(iter(runs))}", headers={"Authorization": f"Bearer {other}"}
            )
            assert foreign.status_code == 404

        sent = {"count": 0}
        lock = threading.Lock()
        failures: list[BaseException] = []

        def client_thread(run_ids: list[str], seed: int) -> None:
            rng = random.Random(seed)
            try:
                with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
                    for run_id in run_ids:
                        summaries = runs[run_id]
                        parts = [
                            IngestBatch(seq=i, summaries=summaries[s : s + PER_BATCH])
                            for i, s in enumerate(range(0, STEPS, PER_BATCH))
                        ]
                        order = list(range(len(parts)))
                        rng.shuffle(order)  # reordered...
                        order += rng.sample(order, len(order) // 2)  # ...and duplicated
                        for i in order:
                            url = f"/api/v1/runs/{run_id}/batches"
                            response = send(http, "POST", url, parts[i].model_dump(mode="json"))
                            assert response.status_code == 200, response.text
                            with lock:
                                sent["count"] += 1
            except BaseException as error:  # surfaced by the main thread
                failures.append(error)

        ids = list(runs)
        threads = [
            threading.Thread(target=client_thread, args=(ids[i::3], i), daemon=True)
            for i in range(3)
        ]
        workers_before = server.worker_pids()
        assert len(workers_before) == 2
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while sent["count"] < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(workers_before[0], signal.SIGKILL)  # mid-ingest
        for thread in threads:
            thread.join(timeout=120)
        assert not failures, failures
        assert all(not t.is_alive() for t in threads)

        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            for run_id in runs:
                done = send(
                    client, "POST", f"/api/v1/runs/{run_id}/finish", {"final_step": STEPS - 1}
                )
                assert done.status_code == 200 and done.json()["status"] == "finished"
            for run_id, summaries in runs.items():
                expected = embedded_measures(tmp_path, SITES, summaries, final_step=STEPS - 1)
                got = client.get(f"/api/v1/runs/{run_id}/measures").json()
                assert len(got) == len(expected)  # every measure exactly once
                stored = {(m["step"], m["name"], m["site"], m["source"]): m["value"] for m in got}
                assert stored.keys() == expected.keys()
                for key, value in expected.items():
                    assert math.isclose(stored[key], value, rel_tol=1e-9, abs_tol=1e-12), key
                replay = list(store.step_summaries(run_id, "train"))
                assert [s.step for s in replay] == list(range(STEPS))
                assert replay == summaries  # every step stored exactly once, as sent
            assert store.pending_batch_count() == 0
            metrics = client.get("/metrics").text
        assert "apmon_ingested_site_summaries_total" in metrics
        # The supervisor replaces the killed worker: it checks its workers every 0.5 s, but a
        # health-check ping of a busy worker can hold that loop for up to 5 s.
        deadline = time.monotonic() + 30
        workers_after = server.worker_pids()
        while (workers_before[0] in workers_after or len(workers_after) != 2) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
            workers_after = server.worker_pids()
        assert workers_before[0] not in workers_after
        assert len(workers_after) == 2
    engine.dispose()
