"""Flow clusters of activation pattern diagrams: their mean strength and purity per site."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import ActivationDiagram, MeasureValue, StepSummary


def flow_measures(diagram: ActivationDiagram) -> dict[str, dict[str, float]]:
    """Per site (the source level of each flow): measures of the flows out of it.

    ``flow_strength``: the mean over samples of the size of their flow cluster (samples sharing
    their patterns at the site and the next level), strength_sum / n. ``flow_purity``: the mean
    over samples of their cluster's purity (share of its most frequent predicted label),
    top_sum / n. ``flow_clusters``: the number of clusters. ``apd_distinct``: the site's distinct
    patterns on the diagram's subset.
    """
    n = diagram.samples
    out: dict[str, dict[str, float]] = {}
    if n == 0:
        return out
    for level, flows in zip(diagram.levels, diagram.flows, strict=False):
        out[level.name] = {
            "flow_strength": flows.strength_sum / n,
            "flow_purity": flows.top_sum / n,
            "flow_clusters": float(flows.clusters),
            "apd_distinct": float(level.distinct),
        }
    return out


def diagram_accuracy(diagram: ActivationDiagram) -> float | None:
    """Share of the diagram's samples whose predicted label is their label."""
    if not diagram.levels or diagram.samples == 0:
        return None
    labels = diagram.levels[-1]
    wrong = sum(labels.errors) + labels.other_errors
    return 1.0 - wrong / diagram.samples


class ActivationDiagramPlugin:
    """Measures of the activation pattern diagram on a probe-set summary that carries one.

    Source: Craighero et al., "Understanding Deep Learning with Activation Pattern Diagrams"
    (seed 003), Sec. 3: flow clusters, their strength (size) and purity (share of the most
    frequently predicted label). Per site: the flows to the next level (the last site's flows go
    to the predicted labels); ``<name>_mean`` over sites; ``apd_accuracy`` run-level. The
    diagram itself is stored with the summary (``Store.diagrams``) and drawn by the report.
    """

    name = "activation_diagram"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Measures of a StepSummary with a diagram; other events produce nothing."""
        if not isinstance(event, StepSummary) or event.diagram is None:
            return PluginResult()
        result = PluginResult()
        totals: dict[str, list[float]] = {}
        for site, values in flow_measures(event.diagram).items():
            for name, value in values.items():
                result.measures.append(
                    MeasureValue(name=name, value=value, site=site, source=event.source)
                )
                totals.setdefault(name, []).append(value)
        for name in ("flow_strength", "flow_purity"):
            if name in totals:
                mean = math.fsum(totals[name]) / len(totals[name])
                result.measures.append(
                    MeasureValue(name=f"{name}_mean", value=mean, source=event.source)
                )
        accuracy = diagram_accuracy(event.diagram)
        if accuracy is not None:
            result.measures.append(
                MeasureValue(name="apd_accuracy", value=accuracy, source=event.source)
            )
        return result
