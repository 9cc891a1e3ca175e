"""Entropy family: distinct patterns, most-frequent-pattern share, entropy, relative entropy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import MeasureValue, SiteSummary, StepSummary


def entropy_bits(spectrum: list[tuple[int, int]], rows: int) -> float:
    """Shannon entropy in bits of a count vector given by its count-of-counts spectrum.

    With p_i = c_i / n:  H = -sum_i p_i log2 p_i = log2 n - (1/n) sum_c m_c c log2 c,
    where m_c patterns occur exactly c times. Exact up to floating-point rounding.
    """
    if rows == 0:
        return 0.0
    weighted = math.fsum(m * c * math.log2(c) for c, m in spectrum)
    return max(0.0, math.log2(rows) - weighted / rows)


def entropy_family(summary: SiteSummary, units: int) -> dict[str, float]:
    """distinct, max_freq, entropy and rel_entropy of one site summary.

    rel_entropy = H / min(d, log2 n) (Hartmann et al. 2021, Sec. 3; thesis Sec. 3.1.2): the
    maximum entropy reachable with d binary units and n rows, so 1 means every row distinct
    (or every unit pattern equally likely). Defined as 0 when n <= 1.
    """
    n = summary.rows
    if n == 0:
        return {}
    h = entropy_bits(summary.spectrum, n)
    max_count = max((c for c, _ in summary.spectrum), default=0)
    ceiling = min(float(units), math.log2(n))
    return {
        "distinct": float(summary.distinct),
        "max_freq": max_count / n,
        "entropy": h,
        "rel_entropy": h / ceiling if ceiling > 0 else 0.0,
    }


class EntropyPlugin:
    """Per-site entropy family for every step summary, plus the site mean of rel_entropy.

    Source: Hartmann et al., "Studying the Evolution of Neural Activation Patterns During
    Training of Feed-Forward ReLU Networks" (2021), Section 3; computed exactly from the
    count-of-counts spectrum, which carries the same information as the count vector up to
    the order of its entries.
    """

    name = "entropy"
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
        relative: list[float] = []
        for site in event.sites:
            info = context.sites.get(site.site)
            if info is None or site.scale_only:  # no patterns were counted at this step
                continue
            values = entropy_family(site, info.units)
            for name, value in values.items():
                result.measures.append(
                    MeasureValue(name=name, value=value, site=site.site, source=event.source)
                )
            if "rel_entropy" in values:
                relative.append(values["rel_entropy"])
        if relative:
            result.measures.append(
                MeasureValue(
                    name="rel_entropy_mean",
                    value=math.fsum(relative) / len(relative),
                    source=event.source,
                )
            )
        return result
