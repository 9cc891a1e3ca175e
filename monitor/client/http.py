"""HTTP transport: batches to the apmon service, spooled on disk until acknowledged.

A background thread ships a run's records in batches, and every batch stays in the local spool
until the service has acknowledged it.

Each batch carries its stream and an increasing ``seq``; the service stores a (run, stream, seq)
once, so resending after a timeout, a crash or an outage is always safe. The run id is chosen
here (a UUID) and the run is opened with an idempotent PUT, so even the start can wait in the
spool while the service is away. A spool left by a process that died is picked up and delivered
by the next transport that starts with the same ``spool_dir``.

The spool never costs the training job: when the spool directory cannot be written (read-only,
full, missing), batches are kept in memory instead, up to ``spool_memory_records`` records; past
that the oldest records are dropped, counted, reported at close and sent with the run's finish
(the service lists them among the run's errors). The sender thread survives every error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from monitor.schema import (
    MAX_RECORDS,
    AlertValue,
    IngestBatch,
    ProbeRecord,
    RunStart,
    SiteInfo,
    StepSummary,
)
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


@dataclass
class _Pending:
    """One request of this run still to deliver: from its spool file, or from memory.

    ``path`` is set when the request is on disk; otherwise ``body`` (start and finish) or
    ``batch`` (kept as a model, so the oldest records can be dropped from it) holds it.
    """

    name: str
    method: str
    url: str
    path: Path | None = None
    body: dict[str, Any] | None = None
    batch: IngestBatch | None = None

    def content(self) -> bytes | None:
        """The request body; None when its spool file is gone."""
        if self.path is not None:
            try:
                return self.path.read_bytes()
            except FileNotFoundError:
                return None
        if self.batch is not None:
            return self.batch.model_dump_json().encode()
        return json.dumps(self.body, separators=(",", ":")).encode()

    @property
    def records(self) -> int:
        """Records this request holds in memory."""
        if self.batch is None:
            return 0
        return len(self.batch.summaries) + len(self.batch.probes)


class HttpTransport:
    """The Transport for ``APMON_SERVER_URL``; every call returns at once.

    A background thread batches records (``batch_max_records`` or ``batch_max_seconds``,
    whichever comes first), writes each batch to ``spool_dir/<run id>/`` (or keeps it in memory
    while that cannot be written) and sends it with retries and backoff.
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
        # This run's requests not yet acknowledged, in order; the sender thread alone uses it.
        self._outbox: deque[_Pending] = deque()
        self._spool_usable = False  # the run's spool directory exists and is locked by us
        self._spool_failing = False  # the last spool write failed (warned once per episode)
        self._memory_records = 0  # records held in memory instead of the spool
        self.dropped = 0  # records dropped because the memory bound was exceeded
        self._refused = False  # the service refused the run's start: nothing more is sent

    # -- Transport ---------------------------------------------------------------------------

    def start_run(self, start: RunStart) -> str:
        """Spool the run's start and start the sender; the id is known at once.

        Never raises for the spool: a directory that cannot be used is warned about once and
        the run is kept in memory.
        """
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            self._lock_file = _lock(self.spool)
            self._spool_usable = True
        except OSError as error:
            self._spool_broken(error)
        self._put(START_FILE, "PUT", f"/api/v1/runs/{self.run_id}", start.model_dump(mode="json"))
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
        on disk for the next transport to deliver (what was only in memory is lost, and said so).
        """
        if self._thread is None:
            return
        self._queue.put(("finish", final_step))
        delivered = self.done.wait(self.settings.finish_timeout_seconds)
        self._stop.set()
        self._thread.join(timeout=self.settings.request_timeout_seconds + 1)
        self._thread = None
        if not delivered and not self._refused:
            in_memory = [p for p in self._outbox if p.path is None]
            if in_memory:
                logger.warning(
                    "apmon service unreachable: %d requests of run %s (%d records) were held in "
                    "memory because the spool directory %s could not be written, and are lost; "
                    "what is on disk there will be delivered by the next monitored run",
                    len(in_memory),
                    self.run_id,
                    sum(p.records for p in in_memory),
                    self.spool,
                )
            else:
                logger.warning(
                    "apmon service unreachable: run %s stays spooled in %s and will be delivered "
                    "by the next monitored run that uses this spool directory",
                    self.run_id,
                    self.spool,
                )
        if self.dropped:
            logger.warning(
                "apmon dropped %d records of run %s: the spool directory %s could not be written "
                "and more than %d records were waiting in memory (APMON_SPOOL_MEMORY_RECORDS)",
                self.dropped,
                self.run_id,
                self.spool,
                self.settings.spool_memory_records,
            )
        self._client.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- the spool ----------------------------------------------------------------------------

    def _put(self, name: str, method: str, url: str, body: dict[str, Any]) -> None:
        """Add a request to the outbox, on disk when the spool takes it, else in memory."""
        path = self._spooled(name, body)
        self._outbox.append(_Pending(name, method, url, path=path, body=None if path else body))

    def _put_batch(self, batch: IngestBatch) -> None:
        name = f"{batch.seq:012d}.json"
        url = f"/api/v1/runs/{self.run_id}/batches"
        path = self._spooled(name, batch.model_dump(mode="json"))
        if path is not None:
            self._outbox.append(_Pending(name, "POST", url, path=path))
            return
        pending = _Pending(name, "POST", url, batch=batch)
        self._outbox.append(pending)
        self._memory_records += pending.records
        self._drop_oldest()

    def _spooled(self, name: str, body: dict[str, Any]) -> Path | None:
        """Write ``body`` to the run's spool; its path, or None when the spool cannot take it."""
        if not self._spool_usable:
            return None
        path = self.spool / name
        try:
            _write_json(path, body)
        except OSError as error:
            self._spool_broken(error)
            return None
        if self._spool_failing:
            self._spool_failing = False
            logger.warning("apmon spool directory %s is writable again", self.spool)
        return path

    def _spool_broken(self, error: OSError) -> None:
        """Warn once per episode that the spool cannot be written, saying what happens now."""
        if self._spool_failing:
            return
        self._spool_failing = True
        logger.warning(
            "apmon cannot write its spool directory %s (%s): training goes on, and run %s's "
            "undelivered batches are kept in memory, at most %d records "
            "(APMON_SPOOL_MEMORY_RECORDS); beyond that the oldest are dropped and counted. "
            "Records kept only in memory are lost if this process dies before delivering them.",
            self.spool,
            error.strerror or error,
            self.run_id,
            self.settings.spool_memory_records,
        )

    def _drop_oldest(self) -> None:
        """Drop the oldest records held in memory while there are more than the bound.

        Records, not batches, are dropped: an emptied batch is still sent, so its seq and the
        sites it announces reach the service and no later batch waits for a gap.
        """
        bound = self.settings.spool_memory_records
        for pending in self._outbox:
            if self._memory_records <= bound:
                return
            batch = pending.batch
            while batch is not None and self._memory_records > bound and pending.records:
                if batch.summaries and (
                    not batch.probes or batch.summaries[0].step <= batch.probes[0].step
                ):
                    batch.summaries.pop(0)
                else:
                    batch.probes.pop(0)
                self._memory_records -= 1
                self.dropped += 1

    # -- the sender thread ---------------------------------------------------------------------

    def _work(self) -> None:
        backoff = 0.0
        next_try = 0.0
        adopted = False
        while not self._stop.is_set():
            try:
                wait = max(0.0, next_try - time.monotonic()) if backoff else self._batch_wait()
                self._collect(wait)
                if time.monotonic() < next_try:
                    continue
                self._deliver_own()
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
                # Anything else (a spool that cannot be read, a bug): the thread lives on.
                backoff = min(max(0.25, backoff * 2), 10.0)
                next_try = time.monotonic() + backoff
                logger.exception("apmon sender failed; retrying in %.2f s", backoff)

    def _heartbeat(self) -> None:
        """Tell the service the run is alive when nothing else did for HEARTBEAT_SECONDS."""
        if time.monotonic() - self._last_contact < HEARTBEAT_SECONDS or self.done.is_set():
            return
        if self._refused or any(p.name == START_FILE for p in self._outbox):
            return  # the run is not open on the service (yet)
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
        limit = min(self.settings.batch_max_records, MAX_RECORDS)
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
                if len(self._records) >= limit:
                    self._cut()
            elif kind == "finish":
                self._cut()
                finish: dict[str, Any] = {"final_step": int(item)}
                if self.dropped:
                    finish["dropped_records"] = self.dropped
                self._put(FINISH_FILE, "POST", f"/api/v1/runs/{self.run_id}/finish", finish)
                self._finish_requested = True
                return
        aged = self._open_since is not None and (
            time.monotonic() - self._open_since >= self.settings.batch_max_seconds
        )
        if aged:
            self._cut()

    def _cut(self) -> None:
        """Close the open batch: spool it (or keep it in memory) under the next seq."""
        if not self._records and not self._sites:
            return
        batch = IngestBatch(
            stream=STREAM,
            seq=self._seq,
            sites=self._sites,
            summaries=[r for r in self._records if isinstance(r, StepSummary)],
            probes=[r for r in self._records if isinstance(r, ProbeRecord)],
        )
        self._seq += 1
        self._sites, self._records, self._open_since = [], [], None
        self._put_batch(batch)

    def _deliver_own(self) -> None:
        """Send this run's outbox in order; each request leaves it once the service has it."""
        while self._outbox and not self._refused:
            pending = self._outbox[0]
            body = pending.content()
            if body is not None:
                accepted = self._request(pending.method, pending.url, body, pending.name)
                if not accepted:
                    self._set_aside(pending, body)
            self._outbox.popleft()
            self._memory_records -= pending.records
            if pending.path is not None:
                pending.path.unlink(missing_ok=True)
            if pending.name == FINISH_FILE:
                self.done.set()
                if self._spool_usable:
                    _remove_spool(self.spool)

    def _set_aside(self, pending: _Pending, body: bytes) -> None:
        """Keep a refused request for inspection; a refused start ends delivery of the run."""
        if pending.name == START_FILE:
            self._refused = True
            self.done.set()  # nothing of this run can ever be accepted; finish need not wait
            logger.error(
                "apmon service refused to open run %s; nothing more of it is sent (its spool "
                "%s is kept)",
                self.run_id,
                self.spool,
            )
        if self._spool_usable:
            try:
                rejected = self.spool / REJECTED_DIR
                rejected.mkdir(exist_ok=True)
                (rejected / pending.name).write_bytes(body)
            except OSError as error:
                logger.warning("apmon could not keep refused %s: %s", pending.name, error)

    def _deliver(self, spool: Path) -> bool:
        """Send an orphaned spool directory's start, batches and finish, in that order.

        Each file is deleted once the service has it. True when the run's finish was delivered.
        """
        run_id = spool.name
        for partial in spool.glob("*.partial"):
            partial.unlink(missing_ok=True)  # a write its process died in; never completed
        start = spool / START_FILE
        if start.exists():
            self._send("PUT", f"/api/v1/runs/{run_id}", start)
        if (spool / REJECTED_DIR / START_FILE).exists():
            return False  # the service refused to open this run: nothing of it can be sent
        for path in sorted(spool.glob("[0-9]*.json")):
            self._send("POST", f"/api/v1/runs/{run_id}/batches", path)
        finish = spool / FINISH_FILE
        if finish.exists():
            self._send("POST", f"/api/v1/runs/{run_id}/finish", finish)
            _remove_spool(spool)
            return True
        return False

    def _send(self, method: str, url: str, path: Path) -> None:
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return  # delivered meanwhile by a process that adopted this spool
        if self._request(method, url, body, path.name):
            path.unlink(missing_ok=True)
            return
        rejected = path.parent / REJECTED_DIR
        rejected.mkdir(exist_ok=True)
        path.replace(rejected / path.name)

    def _request(self, method: str, url: str, body: bytes, name: str) -> bool:
        """Send one request: True when accepted, False when refused for good (logged)."""
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
            self.delivered += 1
            return True
        detail = response.text[:500]
        if response.status_code in PERMANENT:
            self.rejected += 1
            logger.error(
                "apmon service refused %s (HTTP %d: %s); kept aside in %s",
                name,
                response.status_code,
                detail,
                REJECTED_DIR,
            )
            return False
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
            except (FileNotFoundError, NotADirectoryError):
                continue  # delivered and removed meanwhile
            except OSError as error:
                logger.warning("apmon cannot lock the spool %s (%s); left alone", spool, error)
                continue
            if held is None:
                continue  # a live transport owns it
            try:
                logger.info("delivering run %s left in the spool by an earlier process", spool.name)
                if not self._deliver(spool) and not any(spool.glob("*.json")):
                    _remove_spool(spool)  # its process died before finishing; all delivered
            finally:
                held.close()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one.

    A write that fails (a full disk) removes its partial file before the error is raised.
    """
    partial = path.with_suffix(".partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise


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
