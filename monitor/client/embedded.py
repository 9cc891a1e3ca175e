"""Embedded transport: the run's plugins, store and MLflow mirror in a host process of its own.

The training process only pickles its records onto a pipe (non-blocking, no thread of its own,
so nothing contends with training for the GIL); ``monitor.host_process`` does the rest. Alerts
come back on a second pipe. ``mark``/``wait_for_mark`` let the monitor wait, at the end of a
step, until the host has run the plugins over the previous step's records, so that an alert
reaches the training job within one step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import time
import uuid
from collections.abc import Sequence
from typing import Any

from monitor.child import start_child
from monitor.frames import FrameReader, encode
from monitor.schema import AlertValue, ProbeRecord, RunStart, SiteInfo, StepSummary
from monitor.settings import Settings

logger = logging.getLogger(__name__)

PIPE_BYTES = 1 << 20  # asked of the kernel for the pipe to the host (Linux; best effort)
# Marks a host that is behind must clear per training step (see ``wait_for_mark``).
CATCH_UP = 2
# Longest ``finish`` waits for the host to store the rest of the run (a local process that is
# working, not a service that may be away: the HTTP transport's finish_timeout_seconds is not it).
FINISH_SECONDS = 600.0
IOV_FRAMES = 64  # frames per writev (Linux takes up to 1024)


class EmbeddedTransport:
    """Runs the plugin host in a child process, so training never waits for SQL or MLflow.

    Bounds: unsent bytes stay below ``settings.embedded_buffer_bytes``; past that the oldest
    records are dropped and counted in ``dropped`` (this happens only when the host stopped
    answering). ``wait_for_mark`` waits at most ``settings.alert_wait_seconds``; a host that
    makes no progress in that time is not waited for again until it moves, so a stuck database
    slows no step by more than that.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_id = ""
        self.mlflow_run_id: str | None = None
        self.failures = 0
        self.dropped = 0
        self.waited_seconds = 0.0
        self.late_marks = 0
        self._alerts: list[AlertValue] = []
        self._reader = FrameReader()
        self._unsent: list[bytes] = []
        self._unsent_bytes = 0
        self._marks_sent = 0
        self._marks_seen = 0
        self._waiting = True
        self._stalled_at = -1
        self._started = False
        self._dead = False
        self._done = False
        self._process: subprocess.Popen[bytes] | None = None
        self._to_host = -1
        self._from_host = -1

    # -- the run -----------------------------------------------------------------------------

    def start_run(self, start: RunStart) -> str:
        """Start the host process and hand it the run; returns at once with the run's id."""
        self.run_id = str(uuid.uuid4())
        try:
            self._process, self._to_host, self._from_host = start_child(
                "monitor.host_process", PIPE_BYTES
            )
        except OSError as error:
            logger.error("apmon could not start its host process (%s); nothing is stored", error)
            self._dead = True
            return self.run_id
        os.set_blocking(self._to_host, False)
        os.set_blocking(self._from_host, False)
        settings = self.settings.model_dump()
        self._send(("start", settings, self.run_id, start))
        return self.run_id

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        """Announce sites (kept in order with the records that use them)."""
        self._send(("sites", list(sites)))

    def send_summary(self, summary: StepSummary) -> None:
        """Hand a step summary to the host (it leaves with the mark that follows it)."""
        self._send(("summary", summary), flush=False)

    def send_probe(self, probe: ProbeRecord) -> None:
        """Hand a probe record to the host."""
        self._send(("probe", probe))

    def mark(self) -> int:
        """Follow the records sent so far with a mark; its number, for ``wait_for_mark``."""
        self._marks_sent += 1
        self._send(("mark", self._marks_sent))
        return self._marks_sent

    def wait_for_mark(self, mark: int, whole: bool = False) -> None:
        """Wait until the host has run the plugins over every record sent before ``mark``.

        A host that is behind (it started late, or it is slower than training for a while) is
        waited for only until it has caught up by ``CATCH_UP`` marks: training then runs at most
        at half the host's pace until the host is level and alerts are timely again. With
        ``whole`` (the mark after an APT probe: the divergence detectors judge it) the wait
        lasts until the host has reached ``mark`` itself, so that a probe's alert arrives in its
        own step even while the host catches up after its start. No wait before the host has
        started, after it failed, or while it makes no progress at all: a host that does not
        move for ``settings.alert_wait_seconds`` is not waited for again until it moves. A wait
        that reaches that limit behind a host that did move gives up for this step only.
        """
        self._receive()
        if self._marks_seen >= mark or self._dead or not self._started:
            return
        if not self._waiting:
            if self._marks_seen == self._stalled_at:
                return
            self._waiting = True  # it moves again
        target = mark if whole else min(mark, self._marks_seen + CATCH_UP)
        begin = time.perf_counter()
        deadline = begin + self.settings.alert_wait_seconds
        seen_at_begin = self._marks_seen
        while self._marks_seen < target and not self._dead:
            left = deadline - time.perf_counter()
            if left <= 0:
                self.late_marks += 1
                if self._marks_seen > seen_at_begin:
                    # A whole wait behind a host that moves, only slowly: not a stalled host
                    logger.warning(
                        "apmon's host is %d steps behind after a %.3g s wait; training goes on "
                        "without its answer (alerts may come late)",
                        mark - self._marks_seen,
                        self.settings.alert_wait_seconds,
                    )
                    break
                logger.warning(
                    "apmon's host made no progress for %.3g s; training no longer waits for it "
                    "until it moves (alerts may come late)",
                    self.settings.alert_wait_seconds,
                )
                self._waiting = False
                self._stalled_at = self._marks_seen
                break
            writable = [self._to_host] if self._unsent else []
            readable, _, _ = select.select([self._from_host], writable, [], left)
            self._flush()
            if readable:
                self._receive()
        self.waited_seconds += time.perf_counter() - begin

    def poll_alerts(self) -> list[AlertValue]:
        """Alerts that arrived since the last call."""
        self._flush()
        self._receive()
        alerts, self._alerts = self._alerts, []
        return alerts

    def pending(self) -> int:
        """Records not yet handed to the host process."""
        return len(self._unsent)

    def finish(self, final_step: int) -> None:
        """Hand over everything, let the host run end-of-run work, collect the last alerts.

        Waits while the host works, up to ``FINISH_SECONDS`` (it stores what it still buffers
        and runs the end-of-run plugins); past that the host goes on on its own (it finishes
        the run and exits) and this returns. The report is attached after this returns.
        """
        if self._process is None or self._done:
            return
        self._done = True
        costs = {
            "dropped_records": float(self.dropped),
            "waited_seconds": self.waited_seconds,
            "late_marks": float(self.late_marks),
        }
        dropped = self.dropped
        self._send(("finish", final_step, costs))
        finish_frame = encode(("finish", final_step, costs))
        if self.dropped != dropped and self._unsent and self._unsent[-1] == finish_frame:
            # Queuing "finish" dropped older records itself (a host that stopped reading):
            # it reports those too. Only an untouched frame is replaced.
            costs["dropped_records"] = float(self.dropped)
            self._unsent[-1] = encode(("finish", final_step, costs))
            self._unsent_bytes += len(self._unsent[-1]) - len(finish_frame)
        deadline = time.monotonic() + FINISH_SECONDS
        finished = False
        while not self._dead and time.monotonic() < deadline:
            writable = [self._to_host] if self._unsent else []
            readable, _, _ = select.select([self._from_host], writable, [], 0.1)
            self._flush()
            if readable and self._receive(final=True):
                finished = True
                break
        if not finished and not self._dead:
            logger.warning(
                "apmon's host is still storing the run after %.0f s; it finishes in the "
                "background (run %s)",
                FINISH_SECONDS,
                self.run_id,
            )
        self._close_to_host()  # the answers stay open: ``wait_for_host`` reads the host's last
        if self.dropped:
            logger.warning("apmon dropped %d records the host never took", self.dropped)

    def wait_for_host(self, timeout: float | None = None) -> bool:
        """After ``finish``: wait until the host has finished MLflow and exited.

        The host brings MLflow up to date, attaches the report and ends the MLflow run after
        the run is stored, so ``close`` does not wait for that; ``mlflow_run_id`` is known once
        this returns True (True: the host exited within ``timeout`` seconds).
        """
        if self._process is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._dead:  # its last word: ("mlflow", run id, failures), then EOF
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([self._from_host], [], [], left)
            if not readable:
                return False
            self._receive()  # EOF marks the host gone (silently, the run being done)
        self._close_pipes()
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            self._process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            return False
        return True

    # -- the pipes ---------------------------------------------------------------------------

    def _send(self, message: Any, flush: bool = True) -> None:
        """Queue one message; ``flush``: write what is queued now.

        A step's summary waits for its mark, so that both reach the host in one write: one
        wake-up of the host per step instead of two.
        """
        if self._dead:
            return
        frame = encode(message)
        self._unsent.append(frame)
        self._unsent_bytes += len(frame)
        while self._unsent_bytes > self.settings.embedded_buffer_bytes and len(self._unsent) > 1:
            # Only a host that stopped reading gets here; keep the start and the newest records.
            dropped = self._unsent.pop(1)
            self._unsent_bytes -= len(dropped)
            self.dropped += 1
        if flush:
            self._flush()

    def _flush(self) -> None:
        """Write the queued frames, as many as the pipe takes, in one system call each time."""
        while self._unsent and not self._dead:
            try:
                written = os.writev(self._to_host, self._unsent[:IOV_FRAMES])
            except BlockingIOError:
                return
            except (BrokenPipeError, OSError):
                self._host_gone("the host process closed its pipe")
                return
            self._unsent_bytes -= written
            while written:
                frame = self._unsent[0]
                if written < len(frame):
                    self._unsent[0] = frame[written:]
                    break
                written -= len(frame)
                self._unsent.pop(0)

    def _receive(self, final: bool = False) -> bool:
        """Read what the host said; True once it said the run is done."""
        done = False
        while not self._dead:
            try:
                data = os.read(self._from_host, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                if not done:
                    self._host_gone("the host process exited")
                break
            for message in self._reader.feed(data):
                kind = message[0]
                if kind == "alerts":
                    self._alerts.extend(message[1])
                elif kind == "mark":
                    self._marks_seen = max(self._marks_seen, message[1])
                elif kind == "started":
                    self._started = True
                    self.mlflow_run_id = message[1]
                elif kind == "failed":
                    logger.error("apmon could not start the run's host: %s", message[1])
                    self._host_gone(None)
                elif kind == "mlflow":  # the host's last word, after "done"
                    self.mlflow_run_id = message[1] or self.mlflow_run_id
                    self.failures += int(message[2])  # those "done" did not count
                elif kind == "done":
                    self._alerts.extend(message[1])
                    self.failures += int(message[2].get("failures", 0))
                    self.mlflow_run_id = message[2].get("mlflow_run_id") or self.mlflow_run_id
                    done = True
            if done and final:
                break
        return done

    def _host_gone(self, why: str | None) -> None:
        if not self._dead and why is not None and not self._done:
            logger.error("apmon's host process stopped (%s); results after this are lost", why)
        self._dead = True
        self.dropped += len(self._unsent)
        self._unsent.clear()
        self._unsent_bytes = 0

    def _close_to_host(self) -> None:
        if self._to_host >= 0:
            with contextlib.suppress(OSError):
                os.close(self._to_host)
        self._to_host = -1

    def _close_pipes(self) -> None:
        self._close_to_host()
        if self._from_host >= 0:
            with contextlib.suppress(OSError):
                os.close(self._from_host)
        self._from_host = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit, modules may be gone
            self._close_pipes()
