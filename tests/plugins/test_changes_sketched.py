"""Sketched pattern changes: ``signed`` exact from the distinct counts, and the stated error
bound of the bottom-k ``appeared``/``disappeared`` on real probe sets."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from monitor.client.summary import DEFAULT_SKETCH_K, to_wire
from monitor.schema import StepSummary
from monitor.sketch import joint_sample, pattern_changes
from plugins.changes import ChangesPlugin, changes_standard_error
from tests.client.test_sketch_error import conv_net, measurements, mlp
from tests.plugins.plugin_fixtures import context, summary_of

STANDARD_ERRORS = 4  # the stated bound: |estimate - exact| <= 4 standard errors


def test_signed_is_exact_when_the_patterns_are_sketched() -> None:
    rng = random.Random(3)
    plugin, state = ChangesPlugin(), {}
    pool = rng.sample(range(1, 2**63), 4000)
    a = [p for p in pool[:1500] for _ in range(rng.randint(1, 3))]
    b = [p for p in pool[500:2000] for _ in range(rng.randint(1, 3))]  # same distinct count
    ctx = context({"s": 4})
    for step, rows in enumerate((a, b)):
        event = StepSummary(step=step, source="probe_set", sites=[summary_of("s", rows, k=64)])
        assert not event.sites[0].patterns_exact
        result = plugin.process(event, ctx, state, {})
    got = {m.name: m.value for m in result.measures if m.site == "s"}
    assert got["signed"] == 0.0  # exact: 1500 distinct before and after
    sketched = pattern_changes(summary_of("s", a, k=64), summary_of("s", b, k=64))
    assert sketched["signed"] != 0.0  # the sketch's own difference is not


def exact_changes(a: dict[int, int], b: dict[int, int]) -> tuple[float, float]:
    return len(b.keys() - a.keys()) / len(a), len(a.keys() - b.keys()) / len(a)


@pytest.mark.parametrize("make", [conv_net, mlp])
def test_sketched_changes_within_the_stated_error(make: object) -> None:
    taken = measurements(make, steps=(0, 1, 5, 20, 60))
    ratios, errors = [], []
    for first, second in itertools.combinations(taken, 2):
        for site in first:
            exact_a = to_wire(site, first[site], 10**9)
            exact_b = to_wire(site, second[site], 10**9)
            sketch_a = to_wire(site, first[site], DEFAULT_SKETCH_K)
            sketch_b = to_wire(site, second[site], DEFAULT_SKETCH_K)
            if sketch_a.patterns_exact and sketch_b.patterns_exact:
                continue
            ca, cb = dict(exact_a.patterns), dict(exact_b.patterns)
            appeared, disappeared = exact_changes(ca, cb)
            estimate = pattern_changes(sketch_a, sketch_b)
            union = len(ca.keys() | cb.keys())
            m = len(joint_sample(sketch_a, sketch_b))
            se = changes_standard_error(appeared, disappeared, len(ca) / union, m, union)
            for name, exact, error in zip(
                ("appeared", "disappeared"), (appeared, disappeared), se, strict=True
            ):
                diff = abs(estimate[name] - exact)
                errors.append(diff)
                ratios.append(diff / error if error > 0 else 0.0 if diff == 0 else float("inf"))
    assert len(errors) >= 20  # the sketch was really exercised
    assert max(ratios) <= STANDARD_ERRORS, sorted(ratios)[-5:]
    assert statistics.median(ratios) <= 1.5  # standard errors, not a loose envelope
