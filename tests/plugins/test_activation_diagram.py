"""activation_diagram plugin: flow-cluster strength and purity against a brute force."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from monitor.client.diagram import LABEL_LEVEL, build_diagram
from monitor.schema import SiteSummary, StepSummary
from plugins.activation_diagram import ActivationDiagramPlugin


def brute_flows(a: list[int], b: list[int], predicted: list[int]) -> tuple[float, float, int]:
    """Mean over samples of their cluster's size and purity; the number of clusters."""
    n = len(a)
    members: dict[tuple[int, int], list[int]] = {}
    for s in range(n):
        members.setdefault((a[s], b[s]), []).append(s)
    strength = purity = 0.0
    for s in range(n):
        cluster = members[(a[s], b[s])]
        strength += len(cluster) / n
        purity += max(Counter(predicted[t] for t in cluster).values()) / len(cluster) / n
    return strength, purity, len(members)


@pytest.mark.parametrize("seed", range(6))
def test_flow_measures_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    a = [rng.randrange(4) for _ in range(n)]
    b = [rng.randrange(3) for _ in range(n)]
    predicted = [rng.randrange(3) for _ in range(n)]
    truth = [rng.randrange(3) for _ in range(n)]
    diagram = build_diagram(
        [("a", np.array(a)), ("b", np.array(b))],
        np.array(predicted),
        np.array(truth),
        max_nodes=2,
        max_edges=3,
    )
    sites = [SiteSummary(site=s, rows=n, distinct=0) for s in ("a", "b")]
    event = StepSummary(step=1, source="probe_set", sites=sites, diagram=diagram)
    result = ActivationDiagramPlugin().process(event, None, {}, {})  # type: ignore[arg-type]
    got = {(m.name, m.site): m.value for m in result.measures}
    for site, (x, y) in (("a", (a, b)), ("b", (b, predicted))):
        strength, purity, clusters = brute_flows(x, y, predicted)
        assert got[("flow_strength", site)] == pytest.approx(strength)
        assert got[("flow_purity", site)] == pytest.approx(purity)
        assert got[("flow_clusters", site)] == clusters
        assert got[("apd_distinct", site)] == len(set(x))
    assert ("flow_strength", LABEL_LEVEL) not in got
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / n
    assert got[("apd_accuracy", None)] == pytest.approx(accuracy)
    assert got[("flow_purity_mean", None)] == pytest.approx(
        (got[("flow_purity", "a")] + got[("flow_purity", "b")]) / 2
    )
    # every sample is in exactly one Fig. 3 cell of each flow
    for flows in diagram.flows:
        assert sum(cell[2] for cell in flows.cells) == n
        assert sum(edge[2] for edge in flows.edges) + flows.rest[0] == n


def test_summaries_without_a_diagram_produce_nothing() -> None:
    event = StepSummary(step=1, source="probe_set", sites=[])
    assert ActivationDiagramPlugin().process(event, None, {}, {}).measures == []  # type: ignore[arg-type]
