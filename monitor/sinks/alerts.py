"""Alerts in MLflow: one tag per kind (count and latest), a count metric, and a JSON list."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from monitor.store.entities import AlertRecord

TAG_MESSAGE_CHARS = 160  # MLflow's run page shows a tag value on one line


class Alert(Protocol):
    """What the tally reads of an alert: a raised ``AlertValue`` or a stored ``AlertRecord``."""

    @property
    def kind(self) -> str:
        """The alert's kind, e.g. ``bad_batch``."""

    @property
    def step(self) -> int:
        """The step it was raised at."""

    @property
    def message(self) -> str:
        """What it says."""


@dataclass
class AlertTally:
    """Counts and the latest alert of each kind, for one run."""

    counts: dict[str, int] = field(default_factory=dict)
    latest: dict[str, Alert] = field(default_factory=dict)

    def add(self, alerts: Iterable[Alert]) -> set[str]:
        """Count the alerts; returns the kinds that changed."""
        changed = set()
        for alert in alerts:
            self.counts[alert.kind] = self.counts.get(alert.kind, 0) + 1
            last = self.latest.get(alert.kind)
            if last is None or alert.step >= last.step:
                self.latest[alert.kind] = alert
            changed.add(alert.kind)
        return changed

    def tag(self, kind: str) -> tuple[str, str]:
        """``apmon.alert.<kind>`` = ``"<count> (latest step <s>: <message>)"``, kept short."""
        last = self.latest[kind]
        message = last.message
        if len(message) > TAG_MESSAGE_CHARS:
            message = message[: TAG_MESSAGE_CHARS - 1] + "…"
        return f"apmon.alert.{kind}", f"{self.counts[kind]} (latest step {last.step}: {message})"

    def tags(self) -> dict[str, str]:
        """Every kind's tag."""
        return dict(self.tag(kind) for kind in sorted(self.counts))

    def metric_key(self, kind: str) -> str:
        """The run-level count of a kind as an MLflow metric key."""
        return f"alerts/{kind}"


def alerts_json(alerts: Iterable[AlertRecord]) -> str:
    """Every stored alert as a JSON list in step order (the ``alerts.json`` artifact)."""
    rows = [
        {**asdict(alert), "created_at": alert.created_at.isoformat(timespec="seconds")}
        for alert in sorted(alerts, key=lambda a: (a.step, a.id))
    ]
    return json.dumps(rows, indent=1, default=str)
