"""Activation Pattern Temperature from APT probes: D and T = -ln(1 - D) per site and mean."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import MeasureValue, ProbeRecord, SiteProbe


def distance(site: SiteProbe, index: int = 0) -> float:
    """D = changed / rows: the share of probe rows whose pattern changed (thesis Eq. 3.15)."""
    return site.changed[index] / site.rows


def temperature(d: float, rows: int) -> float:
    """T = -ln(1 - D) (thesis Eq. 3.16), finite at D = 1.

    D = 1 would be infinite; it is read as D = 1 - 1/(2n), half a row short of all n rows (a
    continuity correction), so T <= ln(2n) stays finite.
    """
    return -math.log(1.0 - min(d, 1.0 - 0.5 / rows))


class AptPlugin:
    """Per APT probe: D and T per site, and ``D_mean``/``T_mean`` over sites (source ``apt``).

    An APT probe has one eta, the used learning rate.

    Source: thesis Sec. 3.2.2, Eqs. (3.15)-(3.16): D is the probability that a row's activation
    pattern differs before and after one optimizer step on the same inputs, T = -ln(1 - D) the
    Activation Pattern Temperature; the layer mean is the thesis' D_mean.
    """

    name = "apt"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Measures of an APT ProbeRecord; other events produce nothing."""
        if not isinstance(event, ProbeRecord) or event.kind != "apt":
            return PluginResult()
        result = PluginResult()
        ds: list[float] = []
        ts: list[float] = []
        for site in event.sites:
            if not site.changed:
                continue
            d = distance(site)
            t = temperature(d, site.rows)
            ds.append(d)
            ts.append(t)
            result.measures.append(MeasureValue(name="D", value=d, site=site.site, source="apt"))
            result.measures.append(MeasureValue(name="T", value=t, site=site.site, source="apt"))
        if ds:
            result.measures.append(
                MeasureValue(name="D_mean", value=math.fsum(ds) / len(ds), source="apt")
            )
            result.measures.append(
                MeasureValue(name="T_mean", value=math.fsum(ts) / len(ts), source="apt")
            )
        return result
