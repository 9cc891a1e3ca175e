"""The contract between the client handle and wherever its records go."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from monitor.schema import AlertValue, ProbeRecord, RunStart, SiteInfo, StepSummary


class Transport(Protocol):
    """Ships a run's records.

    Every method returns at once: delivery happens in the background, and no failure to deliver
    ever raises into the training loop.
    """

    run_id: str

    def start_run(self, start: RunStart) -> str:
        """Open the run; returns its id."""
        ...

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        """Announce newly discovered sites."""
        ...

    def send_summary(self, summary: StepSummary) -> None:
        """Queue one step summary."""
        ...

    def send_probe(self, probe: ProbeRecord) -> None:
        """Queue one probe record."""
        ...

    def poll_alerts(self) -> list[AlertValue]:
        """Alerts that arrived since the last call."""
        ...

    def finish(self, final_step: int) -> None:
        """Deliver everything queued, run end-of-run work, close the run."""
        ...
