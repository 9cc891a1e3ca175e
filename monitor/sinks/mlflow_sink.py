"""MLflow sink: measures as metrics (batched ``log_batch``), alerts as run tags and counts.

Metric keys stay few and readable: ``ap/<measure>/<site>`` per site, ``ap/<measure>`` run-level,
a client's own step scalars under their own names (``lr/group0``), ``alerts/<kind>`` counts.
Heavy per-site arrays (histograms, per-unit rates) stay in SQL only.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from monitor.schema import AlertValue
from monitor.sinks.alerts import AlertTally
from monitor.sinks.keys import MAX_BATCH, metric_key, param
from monitor.sinks.points import Point, PointFilter
from monitor.sinks.tracking import experiment_id

__all__ = ["MAX_BATCH", "MlflowSink", "metric_key", "param"]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from monitor.store.store import PluginOutcome


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
        self.tracking_uri = tracking_uri
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
        self.points = PointFilter(keys, min_interval_seconds)
        self.alerts = AlertTally()

    def log_params(self, params: dict[str, object]) -> None:
        """Log run configuration as MLflow params."""
        self.client.log_batch(
            self.run_id, params=[param(k, v) for k, v in sorted(params.items())][:100]
        )

    def __call__(self, run_id: str, step: int, outcome: PluginOutcome) -> None:
        """Result listener: buffer the outcome's measures, tag its alerts."""
        self.add_points(self.points.outcome_points(step, outcome))
        if outcome.alerts:
            self.log_alerts(step, [alert for _, alert in outcome.alerts])

    def log_alerts(self, step: int, alerts: list[AlertValue]) -> None:
        """Tag the alerts' kinds at once (alerts are rare; a run page should show them live)."""
        kinds = self.alerts.add(alerts)
        self.client.log_batch(
            self.run_id, tags=[RunTag(*self.alerts.tag(kind)) for kind in sorted(kinds)]
        )
        now = int(time.time() * 1000)
        counts = self.alerts.counts
        self.add_points([(self.alerts.metric_key(k), float(counts[k]), now, step) for k in kinds])

    def log_metric(self, key: str, value: float, step: int) -> None:
        """Buffer one metric that is not a plugin measure (e.g. the training loss)."""
        self.add_points(self.points.point(key, value, step))

    def add_points(self, points: list[Point]) -> None:
        """Buffer points (already filtered); flushed in batches of ``flush_every``."""
        self._buffer += [Metric(*point) for point in points]
        if len(self._buffer) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics in batches of at most 1000."""
        while self._buffer:
            batch, self._buffer = self._buffer[:MAX_BATCH], self._buffer[MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str = "FINISHED") -> None:
        """Flush (each key's last point included), and end the MLflow run if this sink made it."""
        self.add_points(self.points.held())
        self.flush()
        if self._owns_run:
            self.client.set_terminated(self.run_id, status=status)
