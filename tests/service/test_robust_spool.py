"""Issue 13, the client side: a spool directory that cannot be written, or fills up mid-run, never
costs a training job its steps, against a real ``apmon serve`` on PostgreSQL.

Full and read-only disks are real: a 1 MiB tmpfs (skipped where mounting is not allowed) and a
spool path whose parent is a regular file.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from live_server import free_port, live_server
from torch import nn

from monitor.client.handle import Monitor, watch
from monitor.client.http import HttpTransport
from monitor.settings import Settings
from monitor.store import make_engine
from monitor.store.store import SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BROKEN = "cannot write its spool directory"


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture()
def project(service_pg_url: str) -> Iterator[tuple[SqlStore, str]]:
    engine = make_engine(service_pg_url)
    store = SqlStore(engine)
    yield store, store.create_token("spool")
    engine.dispose()


def settings_for(port: int, token: str, spool: Path, **extra: Any) -> Settings:
    options: dict[str, Any] = {
        "batch_max_records": 4,
        "batch_max_seconds": 0.2,
        "request_timeout_seconds": 5,
        "finish_timeout_seconds": 120,
        **extra,
    }
    return Settings(
        server_url=f"http://127.0.0.1:{port}", token=token, spool_dir=str(spool), **options
    )


def train(settings: Settings, steps: int, at_step: dict[int, Any] | None = None) -> Monitor:
    """A real training loop under watch(); ``at_step[k]`` runs before step k (e.g. a server
    coming back)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    done = 0
    # Every row summarised (capture_rows=None) and patterns counted on every step
    # (capture_budget=None): records big enough to fill a 1 MiB spool. No APT probes: the counts
    # below are of training summaries, one record per step.
    with watch(
        model,
        optimizer,
        settings=settings,
        name="spool test",
        capture_rows=None,
        capture_budget=None,
        apt_every=None,
    ) as monitor:
        for step in range(steps):
            if at_step and step in at_step:
                at_step[step]()
            loss = model(torch.randn(512, 16)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
    assert done == steps  # training ran every step
    return monitor


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def stored_steps(store: SqlStore, run_id: str) -> list[int]:
    return [s.step for s in store.step_summaries(run_id, "train")]


@pytest.mark.parametrize("how", ["parent is a file", "read-only mount"])
def test_an_unwritable_spool_warns_once_and_every_step_is_stored(
    project: tuple[SqlStore, str],
    service_pg_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    store, token = project
    if how == "parent is a file":
        (tmp_path / "a-file").write_text("not a directory")
        spool = tmp_path / "a-file" / "spool"
        context: Any = None
    else:
        context = tmpfs(tmp_path / "ro", "size=1m,ro")
        spool = context.__enter__()
    try:
        port = free_port()
        caplog.set_level(logging.WARNING, logger="monitor.client.http")
        with live_server(service_pg_url, tmp_path, workers=2, port=port):
            monitor = train(settings_for(port, token, spool), steps=40)
        assert len(warnings_of(caplog, BROKEN)) == 1
        message = warnings_of(caplog, BROKEN)[0]
        assert str(spool) in message and "kept in memory" in message and "10000" in message
        assert stored_steps(store, monitor.run_id) == list(range(40))
        assert store.run(monitor.run_id).status == "finished"
        assert isinstance(monitor.transport, HttpTransport) and monitor.transport.dropped == 0
    finally:
        if context is not None:
            context.__exit__(None, None, None)


def test_a_spool_that_fills_mid_run_while_the_server_is_away_loses_nothing(
    project: tuple[SqlStore, str],
    service_pg_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, token = project
    caplog.set_level(logging.WARNING, logger="monitor.client.http")
    port = free_port()
    steps, back_at = 300, 150
    with tmpfs(tmp_path / "full", "size=1m") as spool, ExitStack() as stack:
        settings = settings_for(port, token, spool)

        def server_back() -> None:
            # By now the 1 MiB spool is full: every step so far waits on disk or in memory.
            assert warnings_of(caplog, BROKEN), "the spool never filled up"
            stack.enter_context(live_server(service_pg_url, tmp_path, workers=2, port=port))

        monitor = train(settings, steps, at_step={back_at: server_back})
        transport = monitor.transport
        assert isinstance(transport, HttpTransport)
        assert transport.done.is_set() and transport.dropped == 0
        assert not list(spool.rglob("*.partial"))
        assert not list(spool.rglob("*.json"))  # all delivered, nothing refused
    assert stored_steps(store, monitor.run_id) == list(range(steps))  # each exactly once
    assert store.run(monitor.run_id).status == "finished"
    assert len(warnings_of(caplog, BROKEN)) >= 1
    assert warnings_of(caplog, "writable again")  # space came back once the server took it


def test_past_the_memory_bound_the_oldest_records_are_dropped_counted_and_reported(
    project: tuple[SqlStore, str],
    service_pg_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, token = project
    caplog.set_level(logging.WARNING, logger="monitor.client.http")
    (tmp_path / "a-file").write_text("")
    port = free_port()
    steps, bound = 60, 20
    with ExitStack() as stack:
        settings = settings_for(
            port, token, tmp_path / "a-file" / "spool", spool_memory_records=bound
        )

        def server_back() -> None:
            stack.enter_context(live_server(service_pg_url, tmp_path, workers=1, port=port))

        # The server comes back only after the last step: every record but the newest
        # ``bound`` had to go.
        monitor = train(settings, steps, at_step={steps - 1: server_back})
    transport = monitor.transport
    assert isinstance(transport, HttpTransport)
    stored = stored_steps(store, monitor.run_id)
    assert transport.dropped > 0
    assert len(stored) + transport.dropped == steps  # each step stored once or counted
    assert set(range(steps - bound, steps)) <= set(stored)  # the newest were kept
    assert stored[0] >= steps - bound - 2 * settings.batch_max_records  # the oldest went
    reported = warnings_of(caplog, f"dropped {transport.dropped} records")
    assert len(reported) == 1 and str(bound) in reported[0]
    errors = store.errors(monitor.run_id)
    assert [(source, step) for source, step, _ in errors] == [("apmon.client", steps - 1)]
    assert f"dropped {transport.dropped} records" in errors[0][2]
