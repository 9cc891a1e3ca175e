"""Ingest throughput and latency of the apmon service, side by side with logging to MLflow.

For a 20-site model it starts ``apmon serve`` on loopback for each of SQLite/PostgreSQL x 1/2
workers, lets concurrent clients post batches (default: one step, 20 site summaries) to their own
runs for a fixed time, and reports sustained site-summaries per second (total and per worker)
and p50/p99 request latency with the service saturated (closed loop: each client sends again as
soon as it is answered). Then, on the same server, the clients offer 500 site-summaries/s per
worker on a fixed schedule (open loop) and the p50/p99 latency at that rate is reported, counted
from each request's scheduled time. Then it logs the same scalars the service computed, step by
step, straight to an MLflow tracking server with MlflowClient.log_batch, and prints the ratios.

    python benchmarks/ingest.py                  # everything (about 3 minutes here)
    python benchmarks/ingest.py --seconds 5 --no-mlflow

PostgreSQL: APMON_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test); the
benchmark works in a schema of its own and drops it at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import text

from monitor.schema import IngestBatch, RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.service.launch import serve_command, stop_process_group
from monitor.store import make_engine, upgrade
from monitor.store.store import SqlStore

REPO = Path(__file__).resolve().parents[1]
SITES = [SiteInfo(name=f"features.{i}#0", kind="conv", units=64) for i in range(20)]
ROWS = 256  # rows per site and step (e.g. a batch of 256 samples)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def site_summary(rng: random.Random, site: SiteInfo) -> SiteSummary:
    pool = [rng.randrange(2**64) for _ in range(rng.randint(8, ROWS))]
    counts = Counter(rng.choice(pool) for _ in range(ROWS))
    return SiteSummary(
        site=site.name,
        rows=ROWS,
        distinct=len(counts),
        spectrum=sorted(Counter(counts.values()).items()),
        patterns=sorted(counts.items()),
        unit_on=[rng.randint(0, ROWS) for _ in range(site.units)],
    )


def bodies(seed: int, requests: int, per_request: int) -> list[bytes]:
    """Pre-serialised batches, so the load generator spends little CPU per request."""
    rng = random.Random(seed)
    out = []
    for seq in range(requests):
        summaries = [
            StepSummary(step=step, sites=[site_summary(rng, s) for s in SITES], loss=1.0)
            for step in range(seq * per_request, (seq + 1) * per_request)
        ]
        batch = IngestBatch(seq=seq, sites=SITES if seq == 0 else [], summaries=summaries)
        out.append(batch.model_dump_json().encode())
    return out


@dataclass
class Result:
    label: str
    workers: int
    site_summaries_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    scalars_per_step: float
    paced_rate: float = float("nan")  # site-summaries/s offered in the open-loop phase
    paced_p50_ms: float = float("nan")
    paced_p99_ms: float = float("nan")


def serve(database_url: str, workers: int, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    metrics = Path(tempfile.mkdtemp(dir=tmp))
    env = {
        **os.environ,
        "APMON_DATABASE_URL": database_url,
        "APMON_MLFLOW_TRACKING_URI": "",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
    }
    process = subprocess.Popen(
        serve_command(port, workers),
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    stop(process)
    raise RuntimeError("apmon serve did not become ready")


def stop(process: subprocess.Popen[bytes]) -> None:
    stop_process_group(process, timeout=20)


def load(
    url: str, token: str, payloads: list[list[bytes]], seconds: float, rate: float | None = None
) -> tuple[int, float, list[float], list[str]]:
    """Each client posts its run's batches in order until time is up.

    Closed loop (``rate`` None): each client sends its next batch as soon as the last one is
    answered, so the service is saturated and the latency is mostly queueing. Open loop: the
    clients together send ``rate`` requests per second on a fixed schedule, and a latency is
    counted from the request's scheduled time, so a service that falls behind is charged for
    the wait too (no "coordinated omission").

    Returns steps stored, seconds under load, request latencies and run ids.
    """
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    done = [0] * len(payloads)
    run_ids: list[str] = []
    lock = threading.Lock()
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        for _ in payloads:
            start = RunStart(name="bench", sites=SITES).model_dump_json()
            run_ids.append(http.post("/api/v1/runs", content=start).json()["id"])
    begin = time.monotonic()
    stop_at = begin + seconds
    interval = len(payloads) / rate if rate else 0.0

    def client(index: int) -> None:
        mine: list[float] = []
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            for k, body in enumerate(payloads[index]):
                if rate:
                    scheduled = begin + (k + index / len(payloads)) * interval
                    time.sleep(max(0.0, scheduled - time.monotonic()))
                else:
                    scheduled = time.monotonic()
                if scheduled >= stop_at:
                    break
                response = http.post(f"/api/v1/runs/{run_ids[index]}/batches", content=body)
                mine.append(time.monotonic() - scheduled)
                if response.status_code != 200:
                    raise RuntimeError(f"ingest failed: {response.status_code} {response.text}")
                done[index] += PER_REQUEST
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - begin
    return sum(done), elapsed, latencies, run_ids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def bench_service(
    label: str,
    database_url: str,
    workers: int,
    payloads: list[list[bytes]],
    seconds: float,
    tmp: Path,
) -> tuple[Result, dict[int, dict[str, float]]]:
    engine = make_engine(database_url)
    upgrade(engine)
    store = SqlStore(engine)
    token = store.create_token(f"bench-{uuid.uuid4().hex[:6]}")
    process, url = serve(database_url, workers, tmp)
    try:
        httpx_warm = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
        httpx_warm.get("/api/v1/plugins")  # first request per worker pays imports
        httpx_warm.close()
        steps, elapsed, latencies, run_ids = load(url, token, payloads, seconds)
        paced_rate = TARGET_PER_WORKER * workers
        requests_per_s = paced_rate / (len(SITES) * PER_REQUEST)
        _, _, paced, _ = load(url, token, payloads, seconds, rate=requests_per_s)
    finally:
        stop(process)
    measures = store.measures(run_ids[0])
    per_step: dict[int, dict[str, float]] = {}
    for m in measures:
        key = f"ap/{m.name}" + (f"/{m.site.replace('#', ':')}" if m.site else "")
        per_step.setdefault(m.step, {})[key] = m.value
    engine.dispose()
    rate = steps * len(SITES) / elapsed
    scalars = statistics.mean(len(v) for v in per_step.values()) if per_step else 0.0
    result = Result(
        label,
        workers,
        rate,
        percentile(latencies, 0.5) * 1e3,
        percentile(latencies, 0.99) * 1e3,
        len(latencies),
        scalars,
        paced_rate,
        percentile(paced, 0.5) * 1e3,
        percentile(paced, 0.99) * 1e3,
    )
    return result, per_step


def bench_mlflow(per_step: dict[int, dict[str, float]], seconds: float, tmp: Path) -> Result:
    """Log the same scalars per step straight to an MLflow tracking server (one log_batch per
    step, as ``mlflow.log_metrics`` does), from as many client threads as the service had."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    port = free_port()
    store = tmp / "mlflow"
    store.mkdir()
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--default-artifact-root",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.5)
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("direct")
        steps = sorted(per_step)
        latencies: list[float] = []
        done = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def run_client() -> None:
            run_id = client.create_run(experiment).info.run_id
            mine = []
            for i in range(10**9):
                if time.monotonic() >= stop_at:
                    break
                values = per_step[steps[i % len(steps)]]
                now = int(time.time() * 1000)
                metrics = [Metric(k, v, now, i) for k, v in values.items()]
                started = time.perf_counter()
                client.log_batch(run_id, metrics=metrics)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)
                done[0] += len(mine)

        begin = time.monotonic()
        threads = [threading.Thread(target=run_client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - begin
    finally:
        stop(process)
    scalars = statistics.mean(len(v) for v in per_step.values())
    return Result(
        "MLflow server, log_batch",
        1,
        done[0] * len(SITES) / elapsed,
        percentile(latencies, 0.5) * 1e3,
        percentile(latencies, 0.99) * 1e3,
        len(latencies),
        scalars,
    )


CLIENTS = 4
PER_REQUEST = 1
TARGET_PER_WORKER = 500  # site-summaries/s per worker offered in the open-loop phase


def main() -> None:
    global CLIENTS, PER_REQUEST
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per configuration")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="concurrent clients (runs)")
    parser.add_argument(
        "--steps-per-request", type=int, default=PER_REQUEST, help="steps in each ingest batch"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="skip the direct MLflow path")
    args = parser.parse_args()
    CLIENTS = args.clients
    pg_admin = os.environ.get(
        "APMON_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    PER_REQUEST = args.steps_per_request
    requests = int(args.seconds * 40 / PER_REQUEST) + 50  # more than any configuration sends
    print(
        f"preparing {CLIENTS} x {requests} batches of {PER_REQUEST} step(s) x {len(SITES)} sites",
        flush=True,
    )
    payloads = [bodies(seed, requests, PER_REQUEST) for seed in range(CLIENTS)]
    tmp = Path(tempfile.mkdtemp(prefix="apmon-bench-"))
    schema = f"apmon_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(pg_admin)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in pg_admin else "?"
    pg_url = f"{pg_admin}{separator}options=-csearch_path%3D{schema}"
    results: list[Result] = []
    per_step: dict[int, dict[str, float]] = {}
    try:
        for label, url in (("SQLite", f"sqlite:///{tmp / 'apmon.db'}"), ("PostgreSQL", pg_url)):
            for workers in (1, 2):
                print(f"apmon service, {label}, {workers} worker(s) ...", flush=True)
                result, found = bench_service(label, url, workers, payloads, args.seconds, tmp)
                results.append(result)
                per_step = per_step or found
        if not args.no_mlflow:
            print("MLflow tracking server, direct log_batch ...", flush=True)
            results.append(bench_mlflow(per_step, args.seconds, tmp))
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(
        f"{len(SITES)}-site model, {ROWS} rows per site, {PER_REQUEST} step(s) per request, "
        f"{CLIENTS} clients, "
        f"{args.seconds:.0f} s per configuration, {os.cpu_count()} CPU cores"
    )
    header = (
        f"{'path':<28}{'workers':>8}{'site-summ/s':>13}{'per worker':>12}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'requests':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.label:<28}{r.workers:>8}{r.site_summaries_per_s:>13.0f}"
            f"{r.site_summaries_per_s / r.workers:>12.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
            f"{r.requests:>10}"
        )
    print(
        f"(each step: {results[0].scalars_per_step:.0f} scalars computed by the plugins and stored)"
    )
    print()
    print(
        f"open loop: {TARGET_PER_WORKER} site-summaries/s per worker offered on a fixed schedule, "
        "latency from each request's scheduled time"
    )
    paced_header = f"{'path':<28}{'workers':>8}{'offered/s':>13}{'p50 ms':>9}{'p99 ms':>9}"
    print(paced_header)
    print("-" * len(paced_header))
    for r in results:
        if r.paced_rate == r.paced_rate:  # not NaN: the MLflow path has no open-loop phase
            print(
                f"{r.label:<28}{r.workers:>8}{r.paced_rate:>13.0f}"
                f"{r.paced_p50_ms:>9.1f}{r.paced_p99_ms:>9.1f}"
            )
    by = {(r.label, r.workers): r for r in results}
    pg1, pg2 = by[("PostgreSQL", 1)], by[("PostgreSQL", 2)]
    sq1 = by[("SQLite", 1)]
    print()
    scale = pg2.site_summaries_per_s / pg1.site_summaries_per_s
    print(f"PostgreSQL 2 workers / 1 worker:      {scale:.2f}x")
    versus = pg1.site_summaries_per_s / sq1.site_summaries_per_s
    print(f"PostgreSQL / SQLite (1 worker):       {versus:.2f}x")
    direct = by.get(("MLflow server, log_batch", 1))
    if direct is not None:
        best = max(pg1, pg2, key=lambda r: r.site_summaries_per_s)
        print(
            f"apmon PostgreSQL ({best.workers} w) / direct MLflow:  "
            f"{best.site_summaries_per_s / direct.site_summaries_per_s:.2f}x throughput, "
            f"p99 {best.p99_ms:.0f} ms vs {direct.p99_ms:.0f} ms"
        )
    for r in (pg1, pg2):
        met = r.site_summaries_per_s / r.workers >= TARGET_PER_WORKER and r.paced_p99_ms < 100
        print(
            f"target (>= {TARGET_PER_WORKER} site-summaries/s per worker on PostgreSQL, p99 < 100 "
            f"ms at that rate): {'met' if met else 'NOT met'} with {r.workers} worker(s) "
            f"({r.site_summaries_per_s / r.workers:.0f}/s per worker saturated, "
            f"p99 {r.paced_p99_ms:.0f} ms at {r.paced_rate:.0f}/s)"
        )


if __name__ == "__main__":
    main()
