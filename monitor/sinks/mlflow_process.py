"""The embedded host's MLflow mirror in a process of its own.

Importing MLflow and opening its store take seconds of pure Python (2.5 and 2.2 CPU-s on a
loaded 2-core machine, more on a new store while MLflow migrates it). On a thread of the host
process they held the GIL that the host's plugins need to answer the training job within a step,
and the job waited (``py-spy`` showed the plugin thread waiting for the GIL on 13-20% of its
samples while MLflow connected). Here the host keeps only ``MlflowMirror``, which filters the
points (``PointFilter``, no MLflow import) and writes them to this process over a pipe;
``python -m monitor.sinks.mlflow_process IN_FD OUT_FD`` runs an ``MlflowSink`` on them, at idle
priority (``child.idle_priority``): on a machine whose cores training keeps busy, MLflow
catches up when training pauses or ends (the host finishes it after the job's ``close``).

Messages (``frames``), host to mirror: ``("open", sink arguments, params, apmon run id)``,
``("points", points)``, ``("alerts", step, alerts)``, ``("flush",)``, ``("report", paths)``,
``("close",)``. The mirror answers ``("opened", mlflow run id)`` or ``("failed", why)`` to the
first, and ``("done", failures)`` to flush, report and close.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.child import idle_priority, start_child
from monitor.frames import FrameReader, write_frame
from monitor.sinks.points import Point, PointFilter

logger = logging.getLogger(__name__)

PIPE_BYTES = 1 << 20  # asked of the kernel for the pipe to the mirror (Linux; best effort)
# Points kept for an MLflow that is not open yet (at idle priority on a busy machine it may open
# only when training ends): about 10 MB; a 30-key run at the default 0.1 s interval fills it
# in about 5 minutes, after which it keeps every other point.
MAX_WAITING_POINTS = 100_000

if TYPE_CHECKING:
    from monitor.schema import AlertValue
    from monitor.sinks.mlflow_sink import MlflowSink
    from monitor.store.store import PluginOutcome


class MirrorFailed(RuntimeError):
    """The MLflow process could not open the run, or stopped answering."""


class MlflowMirror:
    """The host's side: ``MlflowSink``'s calls, filtered here and carried out in the mirror.

    Made at once, opened later: ``open`` starts the MLflow process and blocks until the run is
    open (the host calls it on a thread of its own). Until then, and for as long as the mirror
    works, ``__call__`` and ``log_metric`` only collect points (at most ``MAX_WAITING_POINTS``:
    past that every other one is dropped, counted in ``thinned_points``; the apmon database
    keeps every step) and alerts. ``flush`` sends what was collected once the run is open
    (``wait=True``: until MLflow has it); ``attach`` and ``close`` wait for the mirror. After a
    failed ``open`` every call is a no-op.
    """

    def __init__(self, keys: str = "all", min_interval_seconds: float = 0.0) -> None:
        self.failures = 0
        self.thinned_points = 0
        self.run_id: str | None = None
        self.failed = False
        self.points = PointFilter(keys, min_interval_seconds)
        self._waiting: list[Point] = []
        self._alerts: list[tuple[int, list[AlertValue]]] = []
        self._reader = FrameReader()
        self._process: subprocess.Popen[bytes] | None = None
        self._to = self._from = -1

    def open(self, sink_arguments: dict[str, Any], params: dict[str, object], run_id: str) -> str:
        """Start the mirror and open the MLflow run; its id. Raises ``MirrorFailed``."""
        try:
            self._process, self._to, self._from = start_child(
                "monitor.sinks.mlflow_process", PIPE_BYTES
            )
            self._send(("open", sink_arguments, params, run_id))
            answer = self._answer()
            if answer[0] != "opened":
                raise MirrorFailed(str(answer[1]))
        except (MirrorFailed, OSError):
            self.failed = True
            self._end()
            raise
        self.run_id = str(answer[1])  # set last: from here on ``flush`` sends
        return self.run_id

    @property
    def is_open(self) -> bool:
        """The MLflow run is open and the mirror has not failed."""
        return self.run_id is not None and not self.failed

    def __call__(self, run_id: str, step: int, outcome: PluginOutcome) -> None:
        """Collect an outcome's points; its alerts go at once once open (tags show them live)."""
        if self.failed:
            return
        self._collect(self.points.outcome_points(step, outcome))
        if outcome.alerts:
            self._alerts.append((step, [alert for _, alert in outcome.alerts]))
            if self.is_open:
                self.flush()

    def log_metric(self, key: str, value: float, step: int) -> None:
        """Collect one metric that is not a plugin measure (e.g. the training loss)."""
        if not self.failed:
            self._collect(self.points.point(key, value, step))

    def flush(self, wait: bool = False) -> None:
        """Send the collected points and alerts; with ``wait``, return once MLflow has them."""
        if not self.is_open:
            return
        if self._waiting:
            points, self._waiting = self._waiting, []
            self._send(("points", points))
        alerts, self._alerts = self._alerts, []
        for step, step_alerts in alerts:
            self._send(("alerts", step, step_alerts))
        if wait:
            self._send(("flush",))
            self._done()

    def attach(self, paths: Sequence[Path]) -> None:
        """Attach files to the run under ``apmon-report/`` (they must outlive the call only)."""
        if self.is_open:
            self._send(("report", [str(p) for p in paths]))
            self._done()

    def close(self) -> None:
        """Send each key's last point, end the MLflow run and the mirror."""
        if not self.is_open:
            return
        try:
            self._waiting += self.points.held()
            self.flush()
            self._send(("close",))
            self._done()
        finally:
            self._end()

    def _collect(self, points: list[Point]) -> None:
        self._waiting += points
        if len(self._waiting) > MAX_WAITING_POINTS:  # MLflow has been away a long while
            self.thinned_points += len(self._waiting) - len(self._waiting[::2])
            self._waiting = self._waiting[::2]

    def _send(self, message: Any) -> None:
        try:
            write_frame(self._to, message)
        except OSError as error:
            raise MirrorFailed(f"the MLflow process is gone ({error})") from error

    def _answer(self) -> tuple[Any, ...]:
        """The mirror's next answer (this thread waits without the GIL)."""
        while True:
            data = os.read(self._from, 1 << 16)
            if not data:
                code = self._process.wait() if self._process is not None else None
                raise MirrorFailed(f"the MLflow process ended ({code})")
            messages = self._reader.feed(data)
            if messages:
                return tuple(messages[0])

    def _done(self) -> None:
        answer = self._answer()
        self.failures += int(answer[1]) if answer[0] == "done" else 1

    def _end(self) -> None:
        for fd in (self._to, self._from):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to = self._from = -1
        if self._process is None:
            return
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()


def serve(in_fd: int, out_fd: int) -> int:
    """The mirror's loop: open the run, then log what arrives until ``close`` or the pipe ends."""
    reader = FrameReader()
    sink: MlflowSink | None = None
    failures = 0
    while True:
        data = os.read(in_fd, 1 << 20)
        if not data:  # the host is gone without closing: end the run as failed
            if sink is not None:
                with contextlib.suppress(Exception):
                    sink.close(status="FAILED")
            return 0
        for message in reader.feed(data):
            kind = message[0]
            if kind == "open":
                try:
                    sink = _open(*message[1:])
                except Exception as error:
                    logger.exception("MLflow is unavailable")
                    write_frame(out_fd, ("failed", f"{type(error).__name__}: {error}"))
                    return 1
                write_frame(out_fd, ("opened", sink.run_id))
                continue
            if sink is None:
                continue
            try:
                if kind == "points":  # the host sends them every half second or so
                    sink.add_points(message[1])
                    sink.flush()
                elif kind == "alerts":
                    sink.log_alerts(message[1], message[2])
                elif kind == "flush":
                    sink.flush()
                elif kind == "report":  # at the run's end: the report's imports wait until then
                    from monitor.report import log_report_to_mlflow

                    log_report_to_mlflow(sink.tracking_uri, sink.run_id, message[1])
                elif kind == "close":
                    sink.close()
            except Exception:
                failures += 1
                logger.exception("MLflow could not take a %r message", kind)
            if kind in ("flush", "report", "close"):
                write_frame(out_fd, ("done", failures))
                failures = 0
            if kind == "close":
                return 0


def _open(arguments: dict[str, Any], params: dict[str, object], apmon_run_id: str) -> MlflowSink:
    from monitor.sinks.mlflow_sink import MlflowSink  # here: the host imports this module too

    sink = MlflowSink(**arguments)
    sink.log_params(params)
    sink.client.set_tag(sink.run_id, "apmon.run_id", apmon_run_id)  # the user's own run too
    return sink


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m monitor.sinks.mlflow_process IN_FD OUT_FD``."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="apmon mlflow: %(levelname)s %(message)s")
    # MLflow is a mirror: the apmon database has every result and the alerts do not wait for
    # MLflow, so its seconds of imports and writes only use CPU that training leaves idle.
    idle_priority()
    return serve(int(args[0]), int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
