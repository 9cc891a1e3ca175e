"""Embedded transport: plugin host, SQL store and MLflow sink in-process, on a background thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from monitor.host import PluginHost
from monitor.measures import load_plugins
from monitor.schema import AlertValue, ProbeRecord, RunStart, SiteInfo, StepSummary
from monitor.settings import Settings
from monitor.sinks.mlflow_sink import MlflowSink
from monitor.store import open_store
from monitor.store.store import PluginOutcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Sites:
    sites: Sequence[SiteInfo]


_STOP = object()


class EmbeddedTransport:
    """Runs the plugin host in-process, so training never waits for it.

    A fresh SQLite file is migrated on first use; any other database must already be at the
    current schema (``apmon db upgrade``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        fresh_sqlite = settings.database_url.startswith("sqlite")
        self.store = open_store(settings.database_url, auto_upgrade=fresh_sqlite)
        self.registry = load_plugins(only=settings.plugins)
        self.run_id = ""
        self.mlflow: MlflowSink | None = None
        self._alerts: queue.SimpleQueue[AlertValue] = queue.SimpleQueue()
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._host: PluginHost | None = None
        self.failures = 0

    def start_run(self, start: RunStart) -> str:
        """Create the run in SQL and MLflow and start the worker thread."""
        listeners = [self._collect_alerts]
        if self.settings.mlflow_tracking_uri:
            try:
                self.mlflow = MlflowSink(
                    self.settings.mlflow_tracking_uri,
                    self.settings.mlflow_experiment,
                    start.name,
                    start.mlflow_run_id,
                )
                start = start.model_copy(update={"mlflow_run_id": self.mlflow.run_id})
                self.mlflow.log_params({f"apmon.{k}": v for k, v in start.config.items()})
                listeners.append(self.mlflow)  # type: ignore[arg-type]
            except Exception:
                logger.exception("MLflow is unavailable; results go to SQL only")
                self.mlflow = None
        self.run_id = self.store.create_run(self.settings.project, start)
        if self.mlflow is not None:
            self.mlflow.client.set_tag(self.mlflow.run_id, "apmon.run_id", self.run_id)
        self._host = PluginHost(
            self.registry,
            self.store,
            listeners=listeners,
            alert_cooldown_steps=self.settings.alert_cooldown_steps,
        )
        self._thread = threading.Thread(target=self._work, name="apmon-embedded", daemon=True)
        self._thread.start()
        return self.run_id

    def _collect_alerts(self, run_id: str, step: int, outcome: PluginOutcome) -> None:
        for _, alert in outcome.alerts:
            self._alerts.put(alert)

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        """Queue sites (kept in order with the summaries that use them)."""
        self._queue.put(_Sites(list(sites)))

    def send_summary(self, summary: StepSummary) -> None:
        """Queue a step summary."""
        self._queue.put(summary)

    def send_probe(self, probe: ProbeRecord) -> None:
        """Queue a probe record."""
        self._queue.put(probe)

    def poll_alerts(self) -> list[AlertValue]:
        """Alerts raised since the last call."""
        alerts: list[AlertValue] = []
        while True:
            try:
                alerts.append(self._alerts.get_nowait())
            except queue.Empty:
                return alerts

    def _work(self) -> None:
        assert self._host is not None
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, _Sites):
                    self.store.add_sites(self.run_id, item.sites)
                elif isinstance(item, StepSummary):
                    self._host.handle_summary(self.run_id, item)
                elif isinstance(item, ProbeRecord):
                    self._host.handle_probe(self.run_id, item)
            except Exception:
                # The monitor never takes training down: record and carry on.
                self.failures += 1
                logger.exception("apmon could not process a record")

    def pending(self) -> int:
        """Records still queued."""
        return self._queue.qsize()

    def finish(self, final_step: int) -> None:
        """Drain the queue, run end-of-run plugins, close the MLflow run."""
        if self._thread is None or self._host is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        try:
            outcome = self._host.finish(self.run_id, final_step)
            self._collect_alerts(self.run_id, final_step, outcome)
        except Exception:
            self.failures += 1
            logger.exception("apmon end-of-run processing failed")
        if self.mlflow is not None:
            try:
                self.mlflow.close()
            except Exception:
                logger.exception("could not close the MLflow run")
