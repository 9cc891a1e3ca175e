"""Prometheus metrics of the service: ingested summaries, ingest latency, plugin errors, queues.

With several workers, ``apmon serve`` sets PROMETHEUS_MULTIPROC_DIR before they start, and a
scrape of any worker reports the sum over all of them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The service's metric objects, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.site_summaries = Counter(
            "apmon_ingested_site_summaries",
            "Site summaries processed by the plugins.",
            registry=self.registry,
        )
        self.step_summaries = Counter(
            "apmon_ingested_step_summaries",
            "Step summaries processed by the plugins.",
            registry=self.registry,
        )
        self.batches = Counter(
            "apmon_ingest_batches",
            "Ingest requests by result (stored, duplicate, rejected).",
            ["result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "apmon_ingest_latency_seconds",
            "Time to validate, store and process one ingest request.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.plugin_errors = Counter(
            "apmon_plugin_errors",
            "Plugin calls that raised (recorded and skipped).",
            ["plugin"],
            registry=self.registry,
        )
        self.alerts = Counter(
            "apmon_alerts", "Alerts raised, after cool-down.", ["kind"], registry=self.registry
        )
        self.sink_queue = Gauge(
            "apmon_sink_queue_depth",
            "Items waiting for a sink (MLflow metrics, webhook bodies).",
            ["sink"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )

    def render(self, pending_batches: Callable[[], int]) -> bytes:
        """The exposition text; ``pending_batches`` is read from the database at scrape time."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            body = generate_latest(registry)
        else:
            body = generate_latest(self.registry)
        # Written by hand: a Gauge made per scrape would leave files behind in multiprocess mode.
        pending = (
            "# HELP apmon_pending_batches Received batches waiting for an earlier seq of their "
            "stream (queue depth).\n"
            "# TYPE apmon_pending_batches gauge\n"
            f"apmon_pending_batches {pending_batches()}\n"
        )
        return body + pending.encode()
