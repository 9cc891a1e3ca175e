"""Sample-set measures (Haasbroek & Davel): activation fraction, predictability, informativeness."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import MeasureValue, SiteSummary, StepSummary

MEASURES = ("activation_fraction", "predictability", "informativeness")


@dataclass(frozen=True)
class UnitSampleSets:
    """Per-unit sample-set measures of one site (seed 002, eqs. 8-15), unit by unit.

    ``size[i]`` is |S_i|, the rows unit i is on for; ``fraction[i]`` is f_i = (1/|C|) sum_c
    |S_i^(c)| / |S_c| (eqs. 9, 16); ``predictability[i]`` and ``informativeness[i]`` are p_i and
    u_i (eqs. 14, 15), NaN for dead (|S_i| = 0) and always-on (|S_i| = |S|) units, where the
    source leaves them undefined. ``informativeness`` is NaN everywhere with fewer than 2 classes
    (its normaliser log |C| is 0).
    """

    size: np.ndarray
    fraction: np.ndarray
    predictability: np.ndarray
    informativeness: np.ndarray
    rows: int


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise x log(y), with 0 log(anything) = 0 as the source sets 0 log 0 = 0."""
    out = np.zeros_like(x, dtype=np.float64)
    positive = x > 0
    out[positive] = x[positive] * np.log(y[positive])
    return out


def unit_sample_sets(
    class_rows: Mapping[str, int], class_unit_on: Mapping[str, Sequence[int]]
) -> UnitSampleSets:
    """Per-unit measures from per-class row counts |S_c| and per-class on-counts |S_i^(c)|.

    Classes are those with rows (C = {c : |S_c| > 0}). With e(1, c) = |S_i^(c)| / |S| and
    e(0, c) = (|S_c| - |S_i^(c)|) / |S| (eqs. 10, 11):
    p_i = 1 + (1 / log 2) sum_c sum_z e(z, c) log(e(z, c) / (|S_c| / |S|)) (eq. 14: one minus
    H(Z | Y) in bits), u_i = 1 + (1 / log |C|) sum_z sum_c e(z, c) log(e(z, c) / P(Z = z))
    (eq. 15: one minus H(Y | Z) over its maximum log |C|).
    """
    labels = [c for c in sorted(class_rows) if class_rows[c] > 0]
    if not labels:
        empty = np.zeros(0)
        return UnitSampleSets(empty, empty, empty, empty, 0)
    per_class = np.array([class_rows[c] for c in labels], dtype=np.float64)  # |S_c|
    on = np.array([class_unit_on[c] for c in labels], dtype=np.float64)  # (C, units)
    total = float(per_class.sum())  # |S|
    size = on.sum(axis=0)
    fraction = (on / per_class[:, None]).mean(axis=0)
    e1 = on / total
    e0 = (per_class[:, None] - on) / total
    class_share = np.broadcast_to((per_class / total)[:, None], on.shape)
    given_class = _xlogy(e1, np.divide(e1, class_share)) + _xlogy(e0, np.divide(e0, class_share))
    predictability = 1.0 + given_class.sum(axis=0) / math.log(2)
    on_share = np.broadcast_to(size / total, on.shape)
    off_share = 1.0 - on_share
    with np.errstate(divide="ignore", invalid="ignore"):
        given_z = _xlogy(e1, e1 / on_share) + _xlogy(e0, e0 / off_share)
    if len(labels) > 1:
        informativeness = 1.0 + given_z.sum(axis=0) / math.log(len(labels))
    else:
        informativeness = np.full(size.shape, np.nan)
    undefined = (size == 0) | (size == total)
    predictability[undefined] = np.nan
    informativeness[undefined] = np.nan
    return UnitSampleSets(size, fraction, predictability, informativeness, int(total))


def site_averages(units: UnitSampleSets) -> dict[str, float]:
    """The site averages of eqs. 16-17.

    f_l averages f_i over units that are not dead (N_a), p_l and u_l average p_i and u_i over
    units that are neither dead nor always on (N_b). A measure with no units to average is left
    out.
    """
    averages: dict[str, float] = {}
    alive = units.size > 0
    if alive.any():
        averages["activation_fraction"] = float(units.fraction[alive].mean())
    switching = alive & (units.size < units.rows)
    for name, values in (
        ("predictability", units.predictability),
        ("informativeness", units.informativeness),
    ):
        chosen = values[switching]
        if chosen.size and not np.isnan(chosen).any():
            averages[name] = float(chosen.mean())
    return averages


def site_sample_sets(summary: SiteSummary) -> dict[str, float]:
    """Site averages of one summary; empty when it carries no per-class counts."""
    if not summary.class_rows or not summary.class_unit_on:
        return {}
    return site_averages(unit_sample_sets(summary.class_rows, summary.class_unit_on))


class SampleSetsPlugin:
    """Per site, on each labelled probe-set measurement: f_l, p_l and u_l, and their site means.

    Source: Haasbroek & Davel, "Exploring neural network training dynamics through binary node
    activations" (seed 002), eqs. 8-17. A unit's sample set is the set of rows it is on for: a
    sample at a dense site, a spatial position (labelled with its sample's class) at a conv site.
    Stored per site as ``activation_fraction``, ``predictability``, ``informativeness`` (the
    averages of eqs. 16-17; the per-unit values follow from the stored summary's per-class
    on-counts by ``unit_sample_sets``), and ``<name>_mean`` over the sites that have the measure.
    Probe-set summaries without labels, and training summaries, produce nothing.
    """

    name = "sample_sets"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Measures of a labelled probe-set StepSummary; other events produce nothing."""
        if not isinstance(event, StepSummary) or event.source != "probe_set":
            return PluginResult()
        result = PluginResult()
        totals: dict[str, list[float]] = {}
        for site in event.sites:
            for name, value in site_sample_sets(site).items():
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
