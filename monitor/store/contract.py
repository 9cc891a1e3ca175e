"""The storage contract: the abstract Store, what a plugin event's results look like, the errors."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any

from monitor.schema import (
    ActivationDiagram,
    AlertValue,
    FitValue,
    MeasureValue,
    ProbeRecord,
    RunStart,
    SiteInfo,
    StepSummary,
)
from monitor.store.entities import AlertRecord, FitPoint, MeasurePoint, ProbePoint, RunInfo


class StoreError(RuntimeError):
    """A storage operation failed; the message says which and why."""


class NotFound(StoreError):
    """The run, project or token does not exist (or is not visible to the caller)."""


class Store(abc.ABC):
    """What the plugin host, the service and the CLI need from storage."""

    @abc.abstractmethod
    def create_run(self, project: str, start: RunStart, run_id: str | None = None) -> str:
        """Create a run (and its project when new); returns the run id."""

    @abc.abstractmethod
    def add_sites(self, run_id: str, sites: Sequence[SiteInfo]) -> None:
        """Register sites not yet known for the run, keeping first-seen order."""

    @abc.abstractmethod
    def run(self, run_id: str) -> RunInfo:
        """The run, or NotFound."""

    @abc.abstractmethod
    def sites(self, run_id: str) -> dict[str, SiteInfo]:
        """The run's sites by name, in forward-call order."""

    @abc.abstractmethod
    def save_summary(self, run_id: str, summary: StepSummary) -> None:
        """Store one step summary (site summaries, loss, sample indices)."""

    @abc.abstractmethod
    def save_probe(self, run_id: str, probe: ProbeRecord) -> None:
        """Store one probe record, one row per (site, eta)."""

    @abc.abstractmethod
    def plugin_states(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Every plugin's state for the run."""

    @abc.abstractmethod
    def save_outcome(self, run_id: str, step: int, outcome: PluginOutcome) -> None:
        """Store what the plugins produced for one event, and their new states, atomically."""

    @abc.abstractmethod
    def finish_run(self, run_id: str, status: str = "finished") -> None:
        """Mark the run finished."""

    @abc.abstractmethod
    def step_summaries(self, run_id: str, source: str) -> Iterator[StepSummary]:
        """Stored step summaries of one source, in step order."""

    @abc.abstractmethod
    def diagrams(self, run_id: str) -> list[tuple[int, ActivationDiagram]]:
        """Stored activation pattern diagrams as (step, diagram), in step order."""

    @abc.abstractmethod
    def measures(
        self,
        run_id: str,
        name: str | None = None,
        site: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> list[MeasurePoint]:
        """Stored measures, filtered, ordered by step."""

    @abc.abstractmethod
    def fits(self, run_id: str) -> list[FitPoint]:
        """Stored fits, ordered by step."""

    @abc.abstractmethod
    def probes(self, run_id: str) -> list[ProbePoint]:
        """Stored probe points, ordered by step."""

    @abc.abstractmethod
    def alerts(self, run_id: str) -> list[AlertRecord]:
        """Stored alerts, ordered by step."""

    @abc.abstractmethod
    def runs(self, project: str | None = None) -> list[RunInfo]:
        """Runs, newest first."""


class PluginOutcome:
    """Everything the host's plugins produced for one event, ready to store."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.measures: list[tuple[str, str, MeasureValue]] = []
        self.backfill: list[tuple[str, str, int, MeasureValue]] = []
        self.fits: list[tuple[str, str, FitValue]] = []
        self.alerts: list[tuple[str, AlertValue]] = []
        self.errors: list[tuple[str, str]] = []
        self.states: dict[str, dict[str, Any]] = {}
