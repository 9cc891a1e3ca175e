"""Weighted Jaccard of probe-set pattern counts against init, the previous and the final one."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext, RunFinished
from monitor.schema import MeasureValue, SiteSummary, StepSummary
from monitor.sketch import weighted_jaccard
from plugins._state import pack, unpack


def _with_mean(name: str, values: dict[str, float]) -> list[MeasureValue]:
    measures = [
        MeasureValue(name=name, value=v, site=site, source="probe_set")
        for site, v in values.items()
    ]
    if values:
        measures.append(
            MeasureValue(
                name=f"{name}_mean",
                value=math.fsum(values.values()) / len(values),
                source="probe_set",
            )
        )
    return measures


class JaccardPlugin:
    """Weighted Jaccard per site of each probe-set measurement to init, previous and final.

    J_w(c, c') = sum_i min(c_i, c'_i) / sum_i max(c_i, c'_i) (Ruzicka), per site, of each
    probe-set measurement against the first one (``jaccard_init``), the previous one
    (``jaccard_prev``) and, when the run finishes, the last one (``jaccard_final``, back-filled for
    every stored step). Site means are ``*_mean``.

    Source: Hartmann et al. 2021, Sec. 2.2 and Fig. 1E/3; thesis Eq. (3.7). Exact when both
    summaries list every pattern, else the bottom-k estimate of ``monitor.sketch``. Only probe-set
    summaries count: the measure compares the same rows at two network states.
    """

    name = "jaccard"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Init/previous similarity per probe-set summary; final similarity at the run's end."""
        if isinstance(event, RunFinished):
            return PluginResult(backfill=self._against_final(event))
        if not isinstance(event, StepSummary) or event.source != "probe_set":
            return PluginResult()
        init: dict[str, Any] = state.setdefault("init", {})
        previous: dict[str, Any] = state.setdefault("previous", {})
        to_init: dict[str, float] = {}
        to_prev: dict[str, float] = {}
        for site in event.sites:
            if not site.patterns:
                continue
            if site.site in init:
                to_init[site.site] = weighted_jaccard(unpack(init[site.site]), site)
            else:
                init[site.site] = pack(site)
                to_init[site.site] = 1.0
            if site.site in previous:
                to_prev[site.site] = weighted_jaccard(unpack(previous[site.site]), site)
            previous[site.site] = pack(site)
        return PluginResult(
            measures=_with_mean("jaccard_init", to_init) + _with_mean("jaccard_prev", to_prev)
        )

    @staticmethod
    def _against_final(event: RunFinished) -> dict[int, list[MeasureValue]]:
        final: dict[str, SiteSummary] = {}
        for summary in event.summaries("probe_set"):
            for site in summary.sites:
                if site.patterns:
                    final[site.site] = site
        backfill: dict[int, list[MeasureValue]] = {}
        for summary in event.summaries("probe_set"):
            values = {
                site.site: weighted_jaccard(site, final[site.site])
                for site in summary.sites
                if site.site in final and site.patterns
            }
            if values:
                backfill[summary.step] = _with_mean("jaccard_final", values)
        return backfill
