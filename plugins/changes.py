"""Pattern changes between consecutive probe-set measurements: appeared, disappeared, signed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import MeasureValue, StepSummary
from monitor.sketch import pattern_changes
from plugins._state import pack, unpack


class ChangesPlugin:
    r"""Pattern changes per site between the previous and the current probe-set summary.

    On the same rows, with P_s the set of patterns at measurement s:

        appeared    = |P_s \ P_{s-1}| / distinct_{s-1}
        disappeared = |P_{s-1} \ P_s| / distinct_{s-1}
        signed      = appeared - disappeared = (distinct_s - distinct_{s-1}) / distinct_{s-1}

    Source: Hartmann et al. 2021, Sec. 2.2
    ("pattern changes"), thesis Eq. (3.6). ``signed`` is always exact: both summaries carry the
    exact distinct count. ``appeared`` and ``disappeared`` are exact when both summaries list
    every pattern, else the bottom-k estimate of ``monitor.sketch``, whose standard error is
    ``changes_standard_error`` (tested: every sketched value on real probe sets lies within 4 of
    them). Also the site means ``*_mean``. Only probe-set summaries are used: training batches
    differ from step to step, so their changes mean nothing.
    """

    name = "changes"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Changes against the previous probe-set summary; remembers this one for the next."""
        if not isinstance(event, StepSummary) or event.source != "probe_set":
            return PluginResult()
        previous: dict[str, Any] = state.get("previous", {})
        result = PluginResult()
        totals: dict[str, list[float]] = {}  # measure name -> per-site values
        for site in event.sites:
            before = previous.get(site.site)
            if before is not None and before["distinct"] > 0 and site.patterns:
                changes = pattern_changes(unpack(before), site)
                distinct = before["distinct"]
                changes["signed"] = (site.distinct - distinct) / distinct
                for name, value in changes.items():
                    result.measures.append(
                        MeasureValue(name=name, value=value, site=site.site, source="probe_set")
                    )
                    totals.setdefault(name, []).append(value)
            if site.patterns:
                previous[site.site] = pack(site)
        for name, per_site in totals.items():
            result.measures.append(
                MeasureValue(
                    name=f"{name}_mean",
                    value=math.fsum(per_site) / len(per_site),
                    source="probe_set",
                )
            )
        state["previous"] = previous
        return result


def changes_standard_error(
    appeared: float, disappeared: float, earlier_share: float, m: int, population: int
) -> tuple[float, float]:
    """First-order standard errors of the bottom-k ``appeared`` and ``disappeared``.

    Both are ratio estimators over a uniform sample of ``m`` of the ``population`` = |A u B|
    distinct patterns, with denominator indicator "in A" (mean ``earlier_share`` = |A| / N).
    Cochran's ratio-estimator variance with indicator numerators gives
    sqrt((1 - m/N) / m) * sqrt(R (1 + R) / p_A) for appeared (R = appeared; the numerator is
    disjoint from A) and sqrt((1 - m/N) / m) * sqrt(R (1 - R) / p_A) for disappeared (R =
    disappeared; the numerator lies inside A).
    """
    if m <= 0 or earlier_share <= 0:
        return math.inf, math.inf
    scale = math.sqrt(max(0.0, 1.0 - m / max(population, m)) / m)
    return (
        scale * math.sqrt(appeared * (1 + appeared) / earlier_share),
        scale * math.sqrt(max(0.0, disappeared * (1 - disappeared)) / earlier_share),
    )
