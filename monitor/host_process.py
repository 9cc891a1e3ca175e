"""The embedded host process: plugins and SQL store of one run, beside the training job.

``python -m monitor.host_process IN_FD OUT_FD`` is started by the embedded transport. It reads
framed messages from the training process on IN_FD and answers on OUT_FD (see ``frames``). It
never imports torch, so it starts in about a second while training has already begun.

Order of work, so that alerts are never held up by storage:

1. Every message that has arrived is run through the plugins at once (their states live in
   memory), and the alerts it raised and the marks that follow it are answered straight away.
2. Every ``FLUSH_SECONDS``, or at ``SLICE_EVENTS`` events, the buffered events go to the
   writer thread (``host_writer``) in one batch (a batch per step, as when the host handed
   off whenever it was idle for 2 ms, cost a transaction and an MLflow call per step),
   which stores them in transactions of at most ``SLICE_EVENTS`` events and hands their
   MLflow points to the MLflow process (``sinks.mlflow_process``, started by this process so
   that MLflow's seconds of Python never hold this one's GIL); the main thread goes on
   answering. ``StoreBudget`` thins what is stored when storing every step would take more
   than ``settings.host_store_fraction`` of wall time (the detectors still see every step).
   A writer that falls ``WRITER_BATCHES`` batches behind makes the main thread wait, which
   bounds the host's memory; the training side's wait for marks then slows training to the
   pace of the store (back-pressure, counted as wait time by the client).
3. At ``finish`` the run is stored and the end-of-run plugins run; the job's ``close`` gets its
   answer (``done``). Then, at idle priority, the process brings MLflow up to date, attaches the
   report and ends the MLflow run (``settings.mlflow_close_waits``: MLflow before ``done``),
   tells the job ``("mlflow", run id, failures)`` (``EmbeddedTransport.wait_for_host`` reads it)
   and exits; it outlives a job that exits first.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import select
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.child import idle_priority
from monitor.frames import FrameReader, write_frame
from monitor.host import alert_key, run_plugins
from monitor.host_writer import StoreBudget, StoreWriter
from monitor.measures import RunContext, RunFinished, load_plugins
from monitor.schema import (
    AlertValue,
    MeasureValue,
    ProbeRecord,
    RunStart,
    SiteInfo,
    StepSummary,
)
from monitor.settings import Settings
from monitor.sinks.mlflow_process import MlflowMirror
from monitor.store import PluginOutcome, SqlStore, open_store

logger = logging.getLogger("monitor.host_process")

SLICE_EVENTS = 64
HOST_NICENESS = 10
WRITER_BATCHES = 16
FLUSH_SECONDS = 0.5
GC_THRESHOLD = 10_000  # allocations between young-generation collections (CPython: 700)
STATES_SECONDS = 5.0  # plugin states are stored this often, and at the run's end


@dataclass
class _Pending:
    """Events whose plugin results are known but not yet written."""

    sites: list[SiteInfo] = field(default_factory=list)
    events: list[tuple[StepSummary | ProbeRecord, PluginOutcome]] = field(default_factory=list)


class RunHost:
    """One run's plugins, store writes and MLflow mirror, driven message by message.

    ``handle`` runs the plugins over one event and returns its alerts; ``persist`` writes a
    slice of what is buffered. Used by the host process and, in tests, directly.
    """

    def __init__(self, settings: Settings, run_id: str, start: RunStart) -> None:
        self.settings = settings
        self.run_id = run_id
        fresh_sqlite = settings.database_url.startswith("sqlite")
        self.store: SqlStore = open_store(settings.database_url, auto_upgrade=fresh_sqlite)
        self.plugins = load_plugins(only=settings.plugins).ordered()
        self.store.create_run(settings.project, start, run_id=run_id)
        # MLflow (seconds to import and to open its store) runs in a process of its own
        # (``mlflow_process``, at idle priority), opened by a thread, so that the plugins answer
        # from the first step and never wait for the GIL behind MLflow; the mirror collects
        # points meanwhile and sends them once MLflow is there. The thread starts it after
        # ``mlflow_start_delay_seconds``, or at the run's end (``_mlflow_due``) if sooner.
        self.mlflow: MlflowMirror | None = None
        self._mlflow_thread: threading.Thread | None = None
        self._mlflow_due = threading.Event()
        if settings.mlflow_tracking_uri:
            self.mlflow = MlflowMirror(settings.mlflow_keys, settings.mlflow_min_interval_seconds)
            self._mlflow_thread = threading.Thread(
                target=self._connect_mlflow, args=(start,), name="apmon-mlflow", daemon=True
            )
            self._mlflow_thread.start()
        self.sites: dict[str, SiteInfo] = {site.name: site for site in start.sites}
        self.states: dict[str, dict[str, Any]] = {}
        self._written_states: dict[str, dict[str, Any]] = {}
        self._last_alert: dict[str, int] = {}
        self._pending = _Pending()
        self.failures = 0
        self.events = 0
        self.budget = StoreBudget(settings.host_store_fraction)
        self._states_at = time.monotonic()
        self._flushed_at = time.monotonic()
        self.writer = StoreWriter(self._write, limit=WRITER_BATCHES, on_start=lower_priority)

    def _connect_mlflow(self, start: RunStart) -> None:
        assert self.mlflow is not None
        # Idle priority does not keep MLflow's start off training: on a 2-core machine its
        # imports' memory traffic slowed a ResNet-20 step on the other core by up to a fifth
        self._mlflow_due.wait(self.settings.mlflow_start_delay_seconds)
        try:
            from monitor.sinks.tracking import standard_tags

            run_id = self.mlflow.open(
                {
                    "tracking_uri": self.settings.mlflow_tracking_uri,
                    "experiment": self.settings.mlflow_experiment,
                    "run_name": start.name,
                    "mlflow_run_id": start.mlflow_run_id,
                    "tags": {**standard_tags(start), "apmon.run_id": self.run_id},
                },
                {f"apmon.{k}": v for k, v in start.config.items()},
                self.run_id,
            )
            self.store.claim_mlflow_run_id(self.run_id, run_id)
        except Exception:
            logger.exception("MLflow is unavailable; results go to SQL only")

    def _mirror(
        self, event: StepSummary | ProbeRecord | None, step: int, outcome: PluginOutcome
    ) -> None:
        """Hand one outcome (and a summary's loss) to the MLflow mirror."""
        if self.mlflow is None:
            return
        try:
            self.mlflow(self.run_id, step, outcome)
            if isinstance(event, StepSummary) and event.loss is not None:
                self.mlflow.log_metric(f"{event.source}/loss", event.loss, step)
        except Exception:
            self.failures += 1
            logger.exception("MLflow could not take the results of step %d", step)

    @property
    def buffered(self) -> int:
        """Events whose results are not written yet."""
        return len(self._pending.events) + (1 if self._pending.sites else 0)

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        """Known from now on; written with the next slice, before the events that use them."""
        for site in sites:
            if site.name not in self.sites:
                self.sites[site.name] = site
                self._pending.sites.append(site)

    def handle(self, event: StepSummary | ProbeRecord) -> list[AlertValue]:
        """Run the plugins over one event; its alerts, past their cool-down."""
        self.events += 1
        source = event.source if isinstance(event, StepSummary) else event.kind
        context = RunContext(run_id=self.run_id, sites=self.sites)
        outcome = run_plugins(self.plugins, event, context, self.states, event.step, source)
        outcome.alerts = [(p, a) for p, a in outcome.alerts if self._admit(a)]
        outcome.states = {}  # written every STATES_SECONDS, see ``hand_off``
        stored: StepSummary | ProbeRecord = event
        if (
            isinstance(event, StepSummary)
            and event.source == "train"
            and event.sites
            and not outcome.alerts
            and not self.budget.keep(event.step)
        ):
            stored = _thinned(event, outcome)
        self._pending.events.append((stored, outcome))
        for plugin, error in outcome.errors:
            self.failures += 1
            logger.debug("plugin %s failed: %s", plugin, error)
        return [alert for _, alert in outcome.alerts]

    def _admit(self, alert: AlertValue) -> bool:
        key = alert_key(alert)
        last = self._last_alert.get(key)
        if last is not None and alert.step - last < self.settings.alert_cooldown_steps:
            return False
        self._last_alert[key] = alert.step
        return True

    def hand_off(self, states: bool = False) -> None:
        """Give what is buffered to the writer thread; waits only on a writer far behind.

        The plugin states that changed go with it every ``STATES_SECONDS``, or when ``states``.
        """
        pending = self._pending
        now = time.monotonic()
        changed: dict[str, dict[str, Any]] = {}
        if states or now - self._states_at >= STATES_SECONDS:
            self._states_at = now
            for name, state in self.states.items():
                if self._written_states.get(name) != state:
                    changed[name] = pickle.loads(pickle.dumps(state))  # the writer's own copy
            self._written_states.update(changed)
        if not pending.sites and not pending.events and not changed:
            return
        self._pending = _Pending()
        self.writer.submit((pending.sites, pending.events, changed))

    def persist(self) -> None:
        """Store everything buffered, states included, and flush MLflow; returns when done."""
        self.hand_off(states=True)
        self.writer.drain()
        self._flush_mlflow(wait=True)

    def _write(self, batch: tuple[list[SiteInfo], list[Any], dict[str, dict[str, Any]]]) -> None:
        """On the writer thread: store a batch in slices, mirror it to MLflow, time it all."""
        sites, events, states = batch
        began = time.perf_counter()
        for start in range(0, max(len(events), 1), SLICE_EVENTS):
            chunk = events[start : start + SLICE_EVENTS]
            last = start + SLICE_EVENTS >= len(events)
            try:
                self.store.save_events(
                    self.run_id, sites if start == 0 else [], chunk, states if last else {}
                )
            except Exception:
                # Nothing of this slice is stored; keep going with the next ones, never stall.
                self.failures += 1
                logger.exception(
                    "apmon could not store %d events of run %s", len(chunk), self.run_id
                )
        for event, outcome in events:
            self._mirror(event, event.step, outcome)
        if time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self._flush_mlflow()
        full = sum(1 for e, _ in events if isinstance(e, StepSummary) and e.sites)
        self.budget.note_written(full, time.perf_counter() - began)

    def _flush_mlflow(self, wait: bool = False) -> None:
        self._flushed_at = time.monotonic()
        if self.mlflow is None:
            return
        try:
            self.mlflow.flush(wait=wait)
        except Exception:
            self.failures += 1
            logger.exception("could not send metrics to MLflow")

    def finish(self, final_step: int, costs: dict[str, float] | None = None) -> list[AlertValue]:
        """Write everything, run end-of-run plugins, close the run and the MLflow run.

        ``costs`` are the training side's own figures (records dropped, seconds waited for this
        host, waits that ran out), stored as run-level measures ``monitor/<name>`` of the final
        step so that a thinned or slowed run says so.
        """
        costs = {**(costs or {}), "thinned_steps": float(self.budget.thinned)}
        outcome = PluginOutcome("train")
        outcome.measures = [
            ("monitor", "1", MeasureValue(name=f"monitor/{name}", value=value))
            for name, value in sorted(costs.items())
        ]
        self._pending.events.append((StepSummary(step=final_step, sites=[]), outcome))
        self.persist()
        alerts: list[AlertValue] = []
        try:
            event = RunFinished(
                final_step, lambda source: self.store.step_summaries(self.run_id, source)
            )
            context = RunContext(run_id=self.run_id, sites=self.sites)
            outcome = run_plugins(self.plugins, event, context, self.states, final_step, "train")
            outcome.alerts = [(p, a) for p, a in outcome.alerts if self._admit(a)]
            self.store.save_outcome(self.run_id, final_step, outcome)
            self.store.finish_run(self.run_id)
            alerts = [alert for _, alert in outcome.alerts]
            self._mirror(None, final_step, outcome)
            if self.settings.mlflow_close_waits:  # every metric is in MLflow when close() returns
                self._finish_mlflow()
        except Exception:
            self.failures += 1
            logger.exception("apmon end-of-run processing failed")
        self.writer.stop()
        self.failures += self.writer.failures
        return alerts

    def _finish_mlflow(self) -> None:
        """Start MLflow now if it is not open (a short run ends before), then send it all."""
        self._mlflow_due.set()
        if self._mlflow_thread is not None:
            self._mlflow_thread.join()
        self._flush_mlflow(wait=True)
        self._take_mlflow_failures()

    def _take_mlflow_failures(self) -> None:
        """Count the mirror's failures so far as the host's, once each.

        With ``mlflow_close_waits`` the answer to ``close`` says them; the rest go with the
        host's last word.
        """
        if self.mlflow is not None:
            self.failures += self.mlflow.failures
            self.mlflow.failures = 0

    def close_mlflow(self) -> None:
        """Bring MLflow up to date, attach the report (``settings.mlflow_report``), end the run.

        The host process does this after it has told the training job that the run is done, at
        idle priority, so that the job's ``close`` waits neither for MLflow nor for rendering.
        """
        if self.mlflow is None:
            return
        self._finish_mlflow()
        if self.settings.mlflow_report and self.mlflow.is_open:
            self._attach_report(self.mlflow)
        try:
            self.mlflow.close()
        except Exception:
            self.failures += 1
            logger.exception("could not close the MLflow run")
        self._take_mlflow_failures()
        if self.mlflow.thinned_points:
            logger.warning(
                "MLflow was away long enough that %d points were thinned out of it (the apmon "
                "database has every step)",
                self.mlflow.thinned_points,
            )

    def _attach_report(self, mirror: MlflowMirror) -> None:
        """Render the run's report and attach it to the MLflow run (before it is ended).

        Rendering (figures, the HTML page) and uploading take seconds, logged at INFO.
        """
        import tempfile
        from pathlib import Path

        from monitor.report import render_report

        began = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="apmon-report-") as out:
                mirror.attach(render_report(self.store, self.run_id, Path(out)))
        except Exception:
            self.failures += 1
            logger.exception("could not attach the report of run %s to MLflow", self.run_id)
        logger.info("report of run %s attached in %.2f s", self.run_id, time.monotonic() - began)

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run this run is mirrored into, if any."""
        return None if self.mlflow is None else self.mlflow.run_id


class _Replies:
    """Answers to the training process; once it is gone, answers are dropped, work goes on."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gone = False

    def __call__(self, message: Any) -> None:
        if self.gone:
            return
        try:
            write_frame(self.fd, message)
        except OSError:  # BrokenPipeError: the job died; its run is still finished below
            self.gone = True


def serve(in_fd: int, out_fd: int) -> int:
    """The process's loop: messages in, alerts and marks out, writes when idle."""
    reply = _Replies(out_fd)
    reader = FrameReader()
    host: RunHost | None = None
    last_step = 0
    last_write = time.monotonic()
    while True:
        waiting = host is not None and host.buffered > 0
        left = max(last_write + FLUSH_SECONDS - time.monotonic(), 0.0)
        readable, _, _ = select.select([in_fd], [], [], left if waiting else None)
        if host is not None and waiting and time.monotonic() - last_write >= FLUSH_SECONDS:
            host.hand_off()
            last_write = time.monotonic()
        if not readable:
            continue
        data = os.read(in_fd, 1 << 20)
        if not data:  # the training process is gone without saying finish: end the run
            if host is not None:
                host.finish(last_step)
                idle_priority()
                host.close_mlflow()
            return 0
        for message in reader.feed(data):
            kind = message[0]
            if kind == "start":
                _, settings_dict, run_id, start = message
                host = _start(reply, Settings(**settings_dict), run_id, start)
                if host is None:
                    return 1
                continue
            if host is None:
                continue
            if kind == "sites":
                host.add_sites(message[1])
            elif kind in ("summary", "probe"):
                last_step = max(last_step, message[1].step)
                alerts = host.handle(message[1])
                if alerts:
                    reply(("alerts", alerts))
            elif kind == "mark":
                reply(("mark", message[1]))
            elif kind == "finish":
                alerts = host.finish(message[1], message[2] if len(message) > 2 else None)
                reply(
                    (
                        "done",
                        alerts,
                        {"failures": host.failures, "mlflow_run_id": host.mlflow_run_id},
                    ),
                )
                # The job's close() has its answer; the rest only uses CPU nothing else wants.
                idle_priority()
                reported = host.failures
                host.close_mlflow()
                # For ``wait_for_host``: the MLflow run, and the failures "done" did not count.
                reply(("mlflow", host.mlflow_run_id, host.failures - reported))
                return 0
            if host.buffered >= SLICE_EVENTS:
                host.hand_off()


def _thinned(event: StepSummary, outcome: PluginOutcome) -> StepSummary:
    """A training step stored without its site summaries and per-site measures.

    See ``StoreBudget``: its loss, sample indices, run-level measures and fits stay.
    """
    outcome.measures = [m for m in outcome.measures if m[2].site is None]
    outcome.backfill = []
    return StepSummary.model_construct(
        step=event.step,
        source=event.source,
        sites=[],
        loss=event.loss,
        sample_indices=event.sample_indices,
        scalars=None,
        diagram=None,
    )


def _start(reply: _Replies, settings: Settings, run_id: str, start: RunStart) -> RunHost | None:
    try:
        host = RunHost(settings, run_id, start)
    except Exception as error:
        logger.exception("apmon could not open the run's store")
        reply(("failed", "".join(traceback.format_exception_only(error)).strip()))
        return None
    reply(("started", host.mlflow_run_id))
    gc.freeze()  # imports, plugins and store: never garbage, never traversed again
    lower_priority()  # started at full speed (training's steps wait for it); then background
    return host


def lower_priority() -> None:
    """Background work: where the host and training compete for a core, training wins.

    Lowers the calling thread's priority (Linux: per thread): the writer and MLflow threads from
    their start, the main thread once the run's plugins are up. The host still runs at full
    speed whenever training waits for it (a mark), so alerts stay timely.
    """
    with contextlib.suppress(OSError):
        os.nice(HOST_NICENESS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m monitor.host_process IN_FD OUT_FD``."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="apmon host: %(levelname)s %(message)s")
    in_fd, out_fd = int(args[0]), int(args[1])
    # Each event allocates a few dozen short-lived objects (records, measures) and frees them
    # by reference counting; the default collector thresholds (700, 10, 10) then run a full
    # collection over the imported modules (MLflow's are many) every 70,000 allocations,
    # measured at 18% of the host's time per event on a small MLP's steps. Fewer collections
    # and the start-up objects frozen (``gc.freeze``, see ``_start``) leave the cyclic garbage
    # it still makes (little) to rarer passes.
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    # The writer thread stores in Python for milliseconds at a time: a short switch interval
    # keeps the plugins' answers to the training job from waiting the default 5 ms for the GIL.
    sys.setswitchinterval(0.0005)
    return serve(in_fd, out_fd)


if __name__ == "__main__":
    sys.exit(main())
