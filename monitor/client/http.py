"""HTTP transport: batches to the apmon service, spooled on disk until acknowledged.

A background thread ships a run's records in batches, and every batch stays in the local spool
until the service has acknowledged it.

Each batch carries its stream and an increasing ``seq``; the service stores a (run, stream, seq)
once, so resending after a timeout, a crash or an outage is always safe. The run id is chosen
here (a UUID) and the run is opened with an idempotent PUT, so even the start can wait in the
spool while the service is away. A spool left by a process that died is picked up and delivered
by the next transport that starts with the same ``spool_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from monitor.schema import AlertValue, IngestBatch, ProbeRecord, RunStart, SiteInfo, StepSummary
from monitor.settings import Settings

try:  # POSIX: a lock file marks a spool directory as owned by a live process.
    import fcntl
except ImportError:  # pragma: no cover - Windows keeps no cross-process ownership
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

STREAM = "main"
START_FILE = "start.json"
FINISH_FILE = "finish.json"
REJECTED_DIR = "rejected"
# 4xx answers that a retry cannot fix: the batch is moved aside (and logged), never resent.
PERMANENT = {400, 405, 409, 413, 422}
HEARTBEAT_SECONDS = 30.0  # a quiet run still says it is alive this often


class _Transient(Exception):
    """The service is away or refused for a reason that may pass (network, 5xx, 401, 429)."""


class HttpTransport:
    """The Transport for ``APMON_SERVER_URL``; every call returns at once.

    A background thread batches records (``batch_max_records`` or ``batch_max_seconds``,
    whichever comes first), writes each batch to ``spool_dir/<run id>/`` and sends it with
    retries and backoff.
    """

    def __init__(self, settings: Settings, client: httpx.Client | None = None) -> None:
        if not settings.server_url:
            raise ValueError("HttpTransport needs settings.server_url")
        self.settings = settings
        self.run_id = str(uuid.uuid4())
        self.spool_root = Path(settings.spool_dir)
        self.spool = self.spool_root / self.run_id
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._client = client or httpx.Client(
            base_url=settings.server_url.rstrip("/"),
            headers=headers,
            timeout=settings.request_timeout_seconds,
        )
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._alerts: queue.SimpleQueue[AlertValue] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_file: Any = None
        self._seq = 0
        self._sites: list[SiteInfo] = []
        self._records: list[StepSummary | ProbeRecord] = []
        self._open_since: float | None = None
        self._finish_requested = False
        self._stop = threading.Event()
        self.done = threading.Event()  # set once the finish has been acknowledged
        self.delivered = 0
        self.rejected = 0
        self._last_contact = time.monotonic()

    # -- Transport ---------------------------------------------------------------------------

    def start_run(self, start: RunStart) -> str:
        """Spool the run's start and start the sender; the id is known at once."""
        self.spool.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(self.spool)
        _write_json(self.spool / START_FILE, start.model_dump(mode="json"))
        self._thread = threading.Thread(target=self._work, name="apmon-http", daemon=True)
        self._thread.start()
        return self.run_id

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        """Queue newly discovered sites; they travel in the batch of the records that use them."""
        self._queue.put(("sites", list(sites)))

    def send_summary(self, summary: StepSummary) -> None:
        """Queue one step summary."""
        self._queue.put(("record", summary))

    def send_probe(self, probe: ProbeRecord) -> None:
        """Queue one probe record."""
        self._queue.put(("record", probe))

    def poll_alerts(self) -> list[AlertValue]:
        """Alerts the service returned since the last call."""
        alerts: list[AlertValue] = []
        while True:
            try:
                alerts.append(self._alerts.get_nowait())
            except queue.Empty:
                return alerts

    def finish(self, final_step: int) -> None:
        """Send everything, then end the run.

        Waits at most ``finish_timeout_seconds`` for the service, after which the spool stays
        on disk for the next transport to deliver.
        """
        if self._thread is None:
            return
        self._queue.put(("finish", final_step))
        if not self.done.wait(self.settings.finish_timeout_seconds):
            logger.warning(
                "apmon service unreachable: run %s stays spooled in %s and will be delivered by "
                "the next monitored run that uses this spool directory",
                self.run_id,
                self.spool,
            )
        self._stop.set()
        self._thread.join(timeout=self.settings.request_timeout_seconds + 1)
        self._thread = None
        self._client.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- the sender thread ---------------------------------------------------------------------

    def _work(self) -> None:
        backoff = 0.0
        next_try = 0.0
        adopted = False
        while not self._stop.is_set():
            wait = max(0.0, next_try - time.monotonic()) if backoff else self._batch_wait()
            self._collect(wait)
            if time.monotonic() < next_try:
                continue
            try:
                self._deliver(self.spool)
                if not adopted:
                    self._adopt_orphans()
                    adopted = True
                self._heartbeat()
                backoff = 0.0
            except _Transient as error:
                backoff = min(max(0.25, backoff * 2), 10.0)
                next_try = time.monotonic() + backoff
                logger.info("apmon service unavailable (%s); retrying in %.2f s", error, backoff)
            except Exception:
                backoff = min(max(0.25, backoff * 2), 10.0)
                next_try = time.monotonic() + backoff
                logger.exception("apmon sender failed; retrying in %.2f s", backoff)

    def _heartbeat(self) -> None:
        """Tell the service the run is alive when nothing else did for HEARTBEAT_SECONDS."""
        if time.monotonic() - self._last_contact < HEARTBEAT_SECONDS or self.done.is_set():
            return
        if (self.spool / START_FILE).exists():
            return  # the run is not open on the service yet
        self._last_contact = time.monotonic()
        try:
            self._client.post(f"/api/v1/runs/{self.run_id}/heartbeat")
        except httpx.HTTPError as error:
            raise _Transient(f"heartbeat: {error}") from error

    def _batch_wait(self) -> float:
        if self._open_since is None:
            return 0.5
        return max(0.0, self._open_since + self.settings.batch_max_seconds - time.monotonic())

    def _collect(self, wait: float) -> None:
        """Take queued items for up to ``wait`` seconds, cutting batches into the spool."""
        deadline = time.monotonic() + wait
        while True:
            try:
                kind, item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if kind == "sites":
                self._sites.extend(item)
            elif kind == "record":
                self._records.append(item)
                if self._open_since is None:
                    self._open_since = time.monotonic()
                if len(self._records) >= self.settings.batch_max_records:
                    self._cut()
            elif kind == "finish":
                self._cut()
                _write_json(self.spool / FINISH_FILE, {"final_step": int(item)})
                self._finish_requested = True
                return
        aged = self._open_since is not None and (
            time.monotonic() - self._open_since >= self.settings.batch_max_seconds
        )
        if aged:
            self._cut()

    def _cut(self) -> None:
        """Close the open batch: write it to the spool under the next seq."""
        if not self._records and not self._sites:
            return
        batch = IngestBatch(
            stream=STREAM,
            seq=self._seq,
            sites=self._sites,
            summaries=[r for r in self._records if isinstance(r, StepSummary)],
            probes=[r for r in self._records if isinstance(r, ProbeRecord)],
        )
        _write_json(self.spool / f"{self._seq:012d}.json", batch.model_dump(mode="json"))
        self._seq += 1
        self._sites, self._records, self._open_since = [], [], None

    def _deliver(self, spool: Path) -> bool:
        """Send one spool directory's start, batches and finish, in that order.

        Each file is deleted once the service has it. True when the run's finish was delivered.
        """
        run_id = spool.name
        start = spool / START_FILE
        if start.exists():
            self._send("PUT", f"/api/v1/runs/{run_id}", start)
        for path in sorted(spool.glob("[0-9]*.json")):
            self._send("POST", f"/api/v1/runs/{run_id}/batches", path)
        finish = spool / FINISH_FILE
        if finish.exists():
            self._send("POST", f"/api/v1/runs/{run_id}/finish", finish)
            if spool == self.spool:
                self.done.set()
            _remove_spool(spool)
            return True
        return False

    def _send(self, method: str, url: str, path: Path) -> None:
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return  # delivered meanwhile by a process that adopted this spool
        try:
            response = self._client.request(
                method, url, content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as error:
            raise _Transient(f"{type(error).__name__}: {error}") from error
        if response.status_code < 300:
            self._last_contact = time.monotonic()
            for alert in response.json().get("alerts", []):
                self._alerts.put(AlertValue.model_validate(alert))
            path.unlink(missing_ok=True)
            self.delivered += 1
            return
        detail = response.text[:500]
        if response.status_code in PERMANENT:
            self.rejected += 1
            rejected = path.parent / REJECTED_DIR
            rejected.mkdir(exist_ok=True)
            path.replace(rejected / path.name)
            logger.error(
                "apmon service refused %s (HTTP %d: %s); kept in %s",
                path.name,
                response.status_code,
                detail,
                rejected,
            )
            return
        raise _Transient(f"HTTP {response.status_code}: {detail}")

    def _adopt_orphans(self) -> None:
        """Deliver spools that processes which died left behind (their lock is free)."""
        if not self.spool_root.is_dir():
            return
        for spool in sorted(self.spool_root.iterdir()):
            if spool == self.spool or not spool.is_dir():
                continue
            try:
                held = _lock(spool, blocking=False)
            except FileNotFoundError:
                continue  # delivered and removed meanwhile
            if held is None:
                continue  # a live transport owns it
            try:
                logger.info("delivering run %s left in the spool by an earlier process", spool.name)
                if not self._deliver(spool) and not any(spool.glob("*.json")):
                    _remove_spool(spool)  # its process died before finishing; all delivered
            finally:
                held.close()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _lock(spool: Path, blocking: bool = True) -> Any:
    """Hold ``spool/.lock`` exclusively; None when another process holds it (non-blocking)."""
    handle = open(spool / ".lock", "a+")  # noqa: SIM115 - kept open while the lock is held
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _remove_spool(spool: Path) -> None:
    """Remove a fully delivered spool, keeping refused batches for inspection."""
    if (spool / REJECTED_DIR).exists():
        return
    shutil.rmtree(spool, ignore_errors=True)
