"""An in-memory Transport for client tests: keeps every record it is given, in order."""

from __future__ import annotations

from collections.abc import Sequence

from monitor.schema import AlertValue, ProbeRecord, RunStart, SiteInfo, StepSummary


class ListTransport:
    """A real implementation of the Transport protocol that stores records in lists.

    ``events`` holds every site, summary and probe in the order they were sent.
    """

    run_id = "test"

    def __init__(self) -> None:
        self.sites: list[SiteInfo] = []
        self.summaries: list[StepSummary] = []
        self.probes: list[ProbeRecord] = []
        self.events: list[SiteInfo | StepSummary | ProbeRecord] = []
        self.finished: int | None = None

    def start_run(self, start: RunStart) -> str:
        return self.run_id

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        self.sites.extend(sites)
        self.events.extend(sites)

    def send_summary(self, summary: StepSummary) -> None:
        self.summaries.append(summary)
        self.events.append(summary)

    def send_probe(self, probe: ProbeRecord) -> None:
        self.probes.append(probe)
        self.events.append(probe)

    def probes_of(self, kind: str) -> list[ProbeRecord]:
        """The probes of one kind ("apt", "sweep", ...), in the order they were sent."""
        return [probe for probe in self.probes if probe.kind == kind]

    def poll_alerts(self) -> list[AlertValue]:
        return []

    def finish(self, final_step: int) -> None:
        self.finished = final_step
