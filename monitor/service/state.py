"""What the request handlers of one app share: settings, store, plugins, ingest, sinks, metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy import Engine

from monitor.measures import PluginRegistry
from monitor.service.ingest import Ingestor
from monitor.service.metrics import ServiceMetrics
from monitor.service.webhooks import WebhookSender
from monitor.settings import Settings
from monitor.sinks.mlflow_async import AsyncMlflowSink
from monitor.store import SqlStore


@dataclass
class TokenCache:
    """Checked tokens for a few seconds, so a busy client does not cost a lookup per request."""

    ttl: float
    entries: dict[str, tuple[str, float]] = field(default_factory=dict)

    def get(self, token: str) -> str | None:
        """The cached project of a token, while fresh."""
        hit = self.entries.get(token)
        if hit is None or time.monotonic() - hit[1] > self.ttl:
            return None
        return hit[0]

    def put(self, token: str, project: str) -> None:
        """Remember a valid token (the cache is bounded: cleared when it grows large)."""
        if len(self.entries) > 10_000:
            self.entries.clear()
        self.entries[token] = (project, time.monotonic())


@dataclass
class Services:
    """Built once per app by ``create_app`` and kept on ``app.state.services``."""

    settings: Settings
    engine: Engine
    store: SqlStore
    registry: PluginRegistry
    ingestor: Ingestor
    metrics: ServiceMetrics
    webhooks: WebhookSender
    mlflow: AsyncMlflowSink | None
    tokens: TokenCache


def services(request: Request) -> Services:
    """Dependency: the app's shared services."""
    found: Services = request.app.state.services
    return found
