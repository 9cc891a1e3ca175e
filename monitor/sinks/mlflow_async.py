"""The service's MLflow sink: a background thread that mirrors committed results into MLflow.

Batched (at most 1000 entries per ``log_batch``) and retried with backoff while MLflow is away,
so ingest latency never depends on MLflow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from monitor.sinks.alerts import AlertTally
from monitor.sinks.keys import MAX_BATCH, metric_key, param, plugin_metric_key
from monitor.sinks.tracking import experiment_id
from monitor.store.store import PluginOutcome

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

CREATED_TAG = "apmon.created"  # set on MLflow runs the service created (and so may terminate)


@dataclass
class _RunWork:
    """Everything waiting to go to MLflow for one apmon run."""

    name: str = ""
    params: dict[str, str] = field(default_factory=dict)
    metrics: deque[tuple[str, float, int, int]] = field(default_factory=deque)
    tags: dict[str, str] = field(default_factory=dict)
    new_run_tags: dict[str, str] = field(default_factory=dict)  # only on a run this sink makes
    terminate: bool = False
    reported: bool = False


class AsyncMlflowSink:
    """Queues per-run metrics and tags and sends them from one background thread.

    ``resolve`` returns the MLflow run id stored for an apmon run (or None); ``claim`` stores a
    newly created one unless another worker got there first, returning the id that holds. So
    every apmon run maps to exactly one MLflow run however many workers log to it: a user's own
    MLflow run when the client passed one, else one this sink creates. ``report`` (apmon run
    id, MLflow run id) attaches end-of-run artifacts before a finished run is closed.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        resolve: Callable[[str], str | None],
        claim: Callable[[str, str], str],
        retry_max_seconds: float = 30.0,
        max_pending_metrics: int = 1_000_000,
        report: Callable[[str, str], None] | None = None,
    ) -> None:
        self._uri = tracking_uri
        self._experiment = experiment
        self._resolve = resolve
        self._claim = claim
        self._retry_max = retry_max_seconds
        self._max_pending = max_pending_metrics
        self._report = report
        self._client: MlflowClient | None = None
        self._ids: dict[str, str] = {}
        self._work: dict[str, _RunWork] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self._in_flight: _RunWork | None = None  # popped by the sink's thread, not yet sent
        self._alerts: dict[str, AlertTally] = {}  # per run (this worker's share of its alerts)
        self.failures = 0
        self.sent_batches = 0
        self._thread = threading.Thread(target=self._loop, name="apmon-mlflow", daemon=True)
        self._thread.start()

    # -- producer side (request threads) -------------------------------------------------------

    def open_run(
        self,
        run_id: str,
        name: str,
        params: dict[str, object],
        tags: dict[str, str] | None = None,
    ) -> None:
        """Make sure the MLflow run exists and carries the run's config as params.

        ``tags`` (MLflow's user and source) go only on a run this sink creates.
        """
        with self._lock:
            work = self._work.setdefault(run_id, _RunWork())
            work.name = name
            work.params.update({k: str(v) for k, v in params.items()})
            work.new_run_tags.update(tags or {})
            work.tags["apmon.run_id"] = run_id
            self._lock.notify()

    def add_outcomes(self, run_id: str, outcomes: list[tuple[int, PluginOutcome]]) -> None:
        """Queue the outcomes' measures as metrics and their alerts as run tags."""
        now = int(time.time() * 1000)
        with self._lock:
            work = self._work.setdefault(run_id, _RunWork())
            tally = self._alerts.setdefault(run_id, AlertTally())
            for step, outcome in outcomes:
                for plugin, _, measure in outcome.measures:
                    key = plugin_metric_key(plugin, measure)
                    work.metrics.append((key, measure.value, now, step))
                for _, _, at_step, measure in outcome.backfill:
                    work.metrics.append((metric_key(measure), measure.value, now, at_step))
                for kind in tally.add(alert for _, alert in outcome.alerts):
                    key, value = tally.tag(kind)
                    work.tags[key] = value
                    count = float(tally.counts[kind])
                    work.metrics.append((tally.metric_key(kind), count, now, step))
            dropped = 0
            while len(work.metrics) > self._max_pending:
                work.metrics.popleft()
                dropped += 1
            if dropped:
                logger.warning(
                    "MLflow queue full: dropped %d oldest metrics of %s", dropped, run_id
                )
            self._lock.notify()

    def finish_run(self, run_id: str) -> None:
        """End the MLflow run once everything queued for it is sent (if this service made it)."""
        with self._lock:
            self._alerts.pop(run_id, None)
            self._work.setdefault(run_id, _RunWork()).terminate = True
            self._lock.notify()

    @property
    def depth(self) -> int:
        """Metrics waiting to be sent, counting those of a send (or retry) under way."""
        with self._lock:
            queued = sum(len(w.metrics) for w in self._work.values())
            in_flight = self._in_flight
            # The sink's thread pops sent metrics off this deque without the lock; len() of
            # a deque is atomic, so a reading taken mid-batch lies between the two counts.
            return queued + (len(in_flight.metrics) if in_flight is not None else 0)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued is sent; False when ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._work or self._in_flight is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Try to send what is queued within ``timeout``, then stop the thread."""
        self.flush(timeout)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=1.0)

    # -- consumer side (the sink's thread) -----------------------------------------------------

    def _loop(self) -> None:
        delay = 0.5
        while True:
            with self._lock:
                while not self._work and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                run_id = next(iter(self._work))
                work = self._work.pop(run_id)
                self._in_flight = work
            try:
                self._send(run_id, work)
                delay = 0.5
            except Exception as error:
                self.failures += 1
                logger.warning("MLflow is unavailable (%s); retrying in %.1f s", error, delay)
                self._requeue(run_id, work)
                with self._lock:
                    self._lock.notify_all()
                    self._lock.wait(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            with self._lock:
                self._in_flight = None
                self._lock.notify_all()

    def _requeue(self, run_id: str, work: _RunWork) -> None:
        """Put unsent work back in front of anything queued for the run since."""
        with self._lock:
            newer = self._work.pop(run_id, None)
            if newer is not None:
                work.metrics.extend(newer.metrics)
                work.params.update(newer.params)
                work.tags.update(newer.tags)
                work.new_run_tags.update(newer.new_run_tags)
                work.terminate = work.terminate or newer.terminate
                work.reported = work.reported or newer.reported
                work.name = newer.name or work.name
            self._work[run_id] = work
            self._in_flight = None  # under the same lock: depth never counts it twice

    def _client_(self) -> MlflowClient:
        # Imported here, on the sink's thread: mlflow takes seconds to import, and workers
        # should be ready to ingest before it has.
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self._uri)
        return self._client

    def _mlflow_id(self, run_id: str, name: str, tags: dict[str, str]) -> str:
        known = self._ids.get(run_id) or self._resolve(run_id)
        if known:
            self._ids[run_id] = known
            return known
        client = self._client_()
        created = client.create_run(
            experiment_id(client, self._experiment),
            run_name=name or None,
            tags={**tags, CREATED_TAG: "1", "apmon.run_id": run_id},
        ).info.run_id
        holder = self._claim(run_id, created)
        if holder != created:  # another worker created it first
            client.delete_run(created)
        self._ids[run_id] = holder
        return holder

    def _send(self, run_id: str, work: _RunWork) -> None:
        """Send one run's work; on failure ``work`` still holds what was not sent."""
        from mlflow.entities import Metric, RunTag

        client = self._client_()
        mlflow_id = self._mlflow_id(run_id, work.name, work.new_run_tags)
        if work.params:
            params = [param(k, v) for k, v in sorted(work.params.items())]
            for start in range(0, len(params), 100):
                client.log_batch(mlflow_id, params=params[start : start + 100])
            work.params = {}
        if work.tags:
            tags = [RunTag(k, v) for k, v in work.tags.items()]
            for start in range(0, len(tags), 100):
                client.log_batch(mlflow_id, tags=tags[start : start + 100])
            work.tags = {}
        while work.metrics:
            batch = [Metric(*work.metrics[i]) for i in range(min(MAX_BATCH, len(work.metrics)))]
            client.log_batch(mlflow_id, metrics=batch)
            self.sent_batches += 1
            for _ in batch:
                work.metrics.popleft()
        if work.terminate and self._report is not None and not work.reported:
            try:  # figures are a convenience: a failure is logged, never retried forever
                self._report(run_id, mlflow_id)
            except Exception:
                logger.exception("could not attach the report of run %s to MLflow", run_id)
            work.reported = True
        if work.terminate:
            run = client.get_run(mlflow_id)
            if run.data.tags.get(CREATED_TAG) == "1":
                client.set_terminated(mlflow_id, status="FINISHED")
            work.terminate = False
