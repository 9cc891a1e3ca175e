"""deploy/start.sh against the local PostgreSQL: wait for the database, migrate as a one-off step,
refuse to serve an out-of-date schema, serve with 2 workers. (Docker itself cannot run here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live_server import REPO, LiveServer, free_port

from monitor.service.launch import stop_process_group
from monitor.store import make_engine
from monitor.store.migrate import current_revision, head_revision

pytestmark = pytest.mark.postgres
START = REPO / "deploy" / "start.sh"


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "APMON_DATABASE_URL": url,
        "APMON_PYTHON": sys.executable,
        "APMON_MLFLOW_TRACKING_URI": "",
        "APMON_DB_WAIT_SECONDS": "10",
        **extra,
    }


def start_sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(START), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_start_script_migrates_once_then_serves(empty_pg_url: str, tmp_path: Path) -> None:
    env = env_for(empty_pg_url)
    refused = start_sh("serve", env=env)
    assert refused.returncode != 0
    assert "apmon db upgrade" in refused.stderr  # names the fixing command

    migrated = start_sh("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    engine = make_engine(empty_pg_url)
    assert current_revision(engine) == head_revision()
    again = start_sh("migrate", env=env)
    assert again.returncode == 0 and "already at revision" in again.stdout

    token = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "tokens", "create", "--project", "deployed"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert token.startswith("apm_")

    port = free_port()
    serve_env = {
        **env,
        "APMON_HOST": "127.0.0.1",
        "APMON_PORT": str(port),
        "APMON_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["sh", str(START), "serve"],
            cwd=REPO,
            env=serve_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        server = LiveServer(process, f"http://127.0.0.1:{port}", log)
        server.wait_ready()
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{server.url}/api/v1/runs", headers=headers).json() == []
        assert httpx.get(f"{server.url}/api/v1/runs").status_code == 401
        assert len(server.worker_pids()) == 2
    finally:
        stop_process_group(process)
    engine.dispose()


def test_start_script_gives_up_on_an_unreachable_database() -> None:
    port = free_port()  # nothing listens there
    env = env_for(f"postgresql://postgres@127.0.0.1:{port}/none", APMON_DB_WAIT_SECONDS="1")
    result = start_sh("migrate", env=env)
    assert result.returncode != 0
    assert "not reachable" in result.stderr
