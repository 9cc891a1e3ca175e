"""Dead and always-on units: the fraction of a site's units that are off (on) for every row."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import MeasureValue, SiteSummary, StepSummary


def dead_and_always_on(summary: SiteSummary) -> dict[str, float]:
    """Dead and always-on shares of one summary's units.

    ``dead`` = |{j : on_j = 0}| / d and ``always_on`` = |{j : on_j = n}| / d, where on_j is the
    number of the n rows in which unit j is on (``unit_on``). Empty when the summary has no rows
    or no unit counts.
    """
    units = len(summary.unit_on)
    if summary.rows == 0 or units == 0:
        return {}
    return {  # list.count: the host runs this for every site of every step
        "dead": summary.unit_on.count(0) / units,
        "always_on": summary.unit_on.count(summary.rows) / units,
    }


class DeadUnitsPlugin:
    """Per site and source: the share of dead units and of always-on units, and their means.

    Dead units are on for no row, always-on units for every row; the site means are
    ``dead_mean``/``always_on_mean``.

    Source: SPEC "Measures" (dead / always-on units); the units a site never switches carry no
    pattern information (thesis Sec. 2.2: a unit that never changes sign acts as a constant or a
    linear unit on the data). Computed exactly from the per-unit on-counts of the summary.
    """

    name = "dead_units"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Measures of a StepSummary; other events produce nothing."""
        if not isinstance(event, StepSummary):
            return PluginResult()
        result = PluginResult()
        totals: dict[str, list[float]] = {}
        for site in event.sites:
            for name, value in dead_and_always_on(site).items():
                result.measures.append(
                    MeasureValue(name=name, value=value, site=site.site, source=event.source)
                )
                totals.setdefault(name, []).append(value)
        for name, values in totals.items():
            result.measures.append(
                MeasureValue(
                    name=f"{name}_mean", value=math.fsum(values) / len(values), source=event.source
                )
            )
        return result
