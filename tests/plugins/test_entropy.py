"""Entropy family from the count-of-counts spectrum against brute force over explicit rows."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from plugin_fixtures import context, summary_of

from monitor.schema import StepSummary
from plugins.entropy import EntropyPlugin, entropy_family


def brute(rows: list[int], units: int) -> dict[str, float]:
    counts = Counter(rows)
    n = len(rows)
    h = -sum(c / n * math.log2(c / n) for c in counts.values())
    ceiling = min(units, math.log2(n))
    return {
        "distinct": float(len(counts)),
        "max_freq": max(counts.values()) / n,
        "entropy": h,
        "rel_entropy": h / ceiling if ceiling > 0 else 0.0,
    }


@pytest.mark.parametrize("seed", range(10))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    units = rng.randint(1, 6)
    rows = [rng.randrange(2**units) for _ in range(rng.randint(1, 60))]
    assert entropy_family(summary_of("s", rows), units) == pytest.approx(brute(rows, units))


def test_plugin_reports_every_site_and_the_mean() -> None:
    rows_a, rows_b = [0, 0, 1, 2], [3, 3, 3, 3]
    event = StepSummary(step=1, sites=[summary_of("a", rows_a), summary_of("b", rows_b)])
    result = EntropyPlugin().process(event, context({"a": 2, "b": 2}), {}, {})
    got = {(m.name, m.site): m.value for m in result.measures}
    assert got[("entropy", "a")] == pytest.approx(1.5)
    assert got[("entropy", "b")] == 0.0
    assert got[("rel_entropy_mean", None)] == pytest.approx((1.5 / 2 + 0.0) / 2)
