"""Step scalars: the numbers a client measured beside the sites (lr, a scheduler's state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import MeasureValue, StepSummary


class ScalarsPlugin:
    """Each finite entry of ``StepSummary.scalars`` becomes a run-level measure of that name.

    The client attaches them with ``Monitor.record_scalars``, which leaves out non-finite values
    (the wire refuses them, and measures must be finite): a diverging value shows as a gap.
    """

    name = "scalars"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Measures of a StepSummary's scalars; other events produce nothing."""
        if not isinstance(event, StepSummary) or not event.scalars:
            return PluginResult()
        return PluginResult(
            measures=[
                MeasureValue(name=name, value=value, source=event.source)
                for name, value in sorted(event.scalars.items())
            ]
        )
