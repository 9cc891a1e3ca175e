"""MLflow sink: measures as metrics (batched ``log_batch``), alerts as run tags and counts.

Metric keys stay few and readable: ``ap/<measure>/<site>`` per site, ``ap/<measure>`` run-level,
a client's own step scalars under their own names (``lr/group0``), ``alerts/<kind>`` counts.
Heavy per-site arrays (histograms, per-unit rates) stay in SQL only.
"""

from __future__ import annotations

import logging
import time

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from monitor.sinks.alerts import AlertTally
from monitor.sinks.keys import MAX_BATCH, metric_key, param, plugin_metric_key
from monitor.sinks.tracking import experiment_id
from monitor.store.store import PluginOutcome

__all__ = ["MAX_BATCH", "MlflowSink", "metric_key", "param"]

logger = logging.getLogger(__name__)


class MlflowSink:
    """Mirrors one apmon run into one MLflow run; call ``flush`` to push buffered metrics."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        mlflow_run_id: str | None = None,
        flush_every: int = MAX_BATCH,
        keys: str = "all",
        min_interval_seconds: float = 0.0,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if mlflow_run_id is None:
            run = self.client.create_run(
                experiment_id(self.client, experiment), run_name=run_name or None, tags=tags
            )
            mlflow_run_id = run.info.run_id
            self._owns_run = True
        else:
            self._owns_run = False
        self.run_id: str = mlflow_run_id
        self._buffer: list[Metric] = []
        self._flush_every = flush_every
        # "summary": run-level measures only (site means, fits of the mean, step scalars), a
        # number of keys that does not grow with the model; "all": every site's too.
        self._all_sites = keys == "all"
        # A key gets a new point only this long after its last one (0: every step). MLflow's
        # charts sample long series anyway; the apmon database keeps every step.
        self._min_interval = min_interval_seconds
        self._last_logged: dict[str, float] = {}
        self._held: dict[str, Metric] = {}  # each key's newest point not logged yet
        self.alerts = AlertTally()

    def log_params(self, params: dict[str, object]) -> None:
        """Log run configuration as MLflow params."""
        self.client.log_batch(
            self.run_id, params=[param(k, v) for k, v in sorted(params.items())][:100]
        )

    def __call__(self, run_id: str, step: int, outcome: PluginOutcome) -> None:
        """Result listener: buffer the outcome's measures, tag its alerts."""
        now = int(time.time() * 1000)
        clock = time.monotonic()
        for plugin, _, measure in outcome.measures:
            if self._all_sites or measure.site is None:
                key = plugin_metric_key(plugin, measure)
                self._add(Metric(key, measure.value, now, step), clock)
        for _, _, at_step, measure in outcome.backfill:
            if self._all_sites or measure.site is None:
                self._buffer.append(Metric(metric_key(measure), measure.value, now, at_step))
        if outcome.alerts:
            kinds = self.alerts.add(alert for _, alert in outcome.alerts)
            # Tags go out at once (alerts are rare, and a run page should show them live).
            self.client.log_batch(
                self.run_id, tags=[RunTag(*self.alerts.tag(kind)) for kind in sorted(kinds)]
            )
            for kind in kinds:
                count = float(self.alerts.counts[kind])
                self._buffer.append(Metric(self.alerts.metric_key(kind), count, now, step))
        if len(self._buffer) >= self._flush_every:
            self.flush()

    def log_metric(self, key: str, value: float, step: int) -> None:
        """Buffer one metric that is not a plugin measure (e.g. the training loss)."""
        self._add(Metric(key, value, int(time.time() * 1000), step), time.monotonic())

    def _add(self, metric: Metric, clock: float) -> None:
        """Buffer a point when its key is due; else hold it as the key's newest (see close)."""
        if self._min_interval > 0:
            last = self._last_logged.get(metric.key)
            if last is not None and clock - last < self._min_interval:
                self._held[metric.key] = metric
                return
            self._last_logged[metric.key] = clock
            self._held.pop(metric.key, None)
        self._buffer.append(metric)

    def flush(self) -> None:
        """Send buffered metrics in batches of at most 1000."""
        while self._buffer:
            batch, self._buffer = self._buffer[:MAX_BATCH], self._buffer[MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str = "FINISHED") -> None:
        """Flush (each key's last point included), and end the MLflow run if this sink made it."""
        self._buffer += self._held.values()
        self._held.clear()
        self.flush()
        if self._owns_run:
            self.client.set_terminated(self.run_id, status=status)
