"""Test helpers: a real ``apmon serve`` on loopback, and synthetic but valid wire records."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from monitor.host import PluginHost
from monitor.measures import load_plugins
from monitor.schema import RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.service.launch import serve_command, stop_process_group
from monitor.store import make_engine, upgrade
from monitor.store.store import SqlStore

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """A running ``apmon serve`` process group."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def worker_pids(self) -> list[int]:
        """PIDs of uvicorn's worker processes (children of the supervisor)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        workers = []
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"resource_tracker" not in cmdline:
                workers.append(int(child))
        return workers

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"apmon serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"apmon serve not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")


@contextmanager
def live_server(
    database_url: str,
    tmp_path: Path,
    workers: int = 2,
    mlflow_uri: str = "",
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LiveServer]:
    """Start ``apmon serve`` on 127.0.0.1 and always stop it (the whole process group)."""
    port = port or free_port()
    metrics_dir = tmp_path / f"metrics-{port}"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "APMON_DATABASE_URL": database_url,
        "APMON_MLFLOW_TRACKING_URI": mlflow_uri,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        **(extra_env or {}),
    }
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            serve_command(port, workers),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", log)
    try:
        server.wait_ready()
        yield server
    finally:
        stop_process_group(process)


# -- synthetic records ------------------------------------------------------------------------


def model_sites(count: int = 20, units: int = 16) -> list[SiteInfo]:
    return [SiteInfo(name=f"net.{i}#0", kind="dense", units=units) for i in range(count)]


def site_summary(rng: random.Random, site: SiteInfo, rows: int = 64) -> SiteSummary:
    """A valid exact summary: ``rows`` patterns drawn from a small pool of fingerprints."""
    pool = [rng.randrange(2**64) for _ in range(rng.randint(1, rows))]
    counts = Counter(rng.choice(pool) for _ in range(rows))
    spectrum = sorted(Counter(counts.values()).items())
    return SiteSummary(
        site=site.name,
        rows=rows,
        distinct=len(counts),
        spectrum=spectrum,
        patterns=sorted(counts.items()),
        unit_on=[rng.randint(0, rows) for _ in range(site.units)],
    )


def step_summaries(seed: int, steps: int, sites: list[SiteInfo]) -> list[StepSummary]:
    rng = random.Random(seed)
    return [
        StepSummary(step=step, sites=[site_summary(rng, s) for s in sites], loss=1.0 / (step + 1))
        for step in range(steps)
    ]


def embedded_measures(
    tmp_path: Path, sites: list[SiteInfo], summaries: list[StepSummary], final_step: int | None
) -> dict[tuple[int, str, str | None, str], float]:
    """The measures embedded mode computes for the same summaries: same plugins, same host,
    run in-process over a fresh SQLite file."""
    engine = make_engine(f"sqlite:///{tmp_path / f'embedded-{time.monotonic_ns()}.db'}")
    upgrade(engine)
    store = SqlStore(engine)
    run_id = store.create_run("embedded", RunStart(sites=sites))
    host = PluginHost(load_plugins(), store)
    for summary in summaries:
        host.handle_summary(run_id, summary)
    if final_step is not None:
        host.finish(run_id, final_step)
    found = {(m.step, m.name, m.site, m.source): m.value for m in store.measures(run_id)}
    engine.dispose()
    return found
