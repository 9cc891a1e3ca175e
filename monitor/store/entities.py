"""Plain entities the store returns; ORM rows never leave the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """A monitored run as stored."""

    id: str
    project: str
    name: str
    status: str
    mlflow_run_id: str | None
    created_at: datetime
    finished_at: datetime | None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MeasurePoint:
    """One stored measure value."""

    step: int
    name: str
    site: str | None
    source: str
    value: float
    plugin: str
    plugin_version: str


@dataclass(frozen=True)
class FitPoint:
    """One stored transition fit."""

    step: int
    site: str | None
    mu: float | None
    sigma: float | None
    residual: float | None
    points: int
    ok: bool
    reason: str


@dataclass(frozen=True)
class ProbePoint:
    """One stored probe point."""

    step: int
    site: str
    kind: str
    lr: float
    eta: float
    rows: int
    changed: int


@dataclass(frozen=True)
class AlertRecord:
    """One stored alert."""

    id: int
    step: int
    kind: str
    severity: str
    site: str | None
    message: str
    evidence: dict[str, Any]
    plugin: str
    created_at: datetime
