"""changes, jaccard, dead_units and apt plugins against brute-force references on small inputs."""

from __future__ import annotations

import math

import pytest
from plugin_fixtures import context, summary_of

from monitor.measures import PluginResult, RunFinished
from monitor.schema import ProbeRecord, SiteProbe, SiteSummary, StepSummary
from plugins.apt import AptPlugin, temperature
from plugins.changes import ChangesPlugin
from plugins.dead_units import DeadUnitsPlugin, dead_and_always_on
from plugins.jaccard import JaccardPlugin

CTX = context({"a": 4, "b": 4})


def values(result: PluginResult) -> dict[tuple[str, str | None], float]:
    return {(m.name, m.site): m.value for m in result.measures}


def probe_set(step: int, a: list[int], b: list[int]) -> StepSummary:
    return StepSummary(
        step=step, source="probe_set", sites=[summary_of("a", a), summary_of("b", b)]
    )


def brute_changes(x: list[int], y: list[int]) -> tuple[float, float]:
    return len(set(y) - set(x)) / len(set(x)), len(set(x) - set(y)) / len(set(x))


def brute_jaccard(x: list[int], y: list[int]) -> float:
    keys = set(x) | set(y)
    return sum(min(x.count(k), y.count(k)) for k in keys) / sum(
        max(x.count(k), y.count(k)) for k in keys
    )


STEPS = [
    ([1, 1, 2, 3], [7, 7, 7, 8]),
    ([1, 2, 2, 4, 5], [7, 8, 9]),
    ([2, 4, 4, 4], [9, 9, 9, 7]),
]


def test_changes_between_consecutive_probe_sets() -> None:
    plugin, state = ChangesPlugin(), {}
    first = plugin.process(probe_set(0, *STEPS[0]), CTX, state, {})
    assert first.measures == []  # nothing to compare with yet
    for before, after, step in ((STEPS[0], STEPS[1], 1), (STEPS[1], STEPS[2], 2)):
        got = values(plugin.process(probe_set(step, *after), CTX, state, {}))
        per_site = []
        for index, site in enumerate("ab"):
            appeared, disappeared = brute_changes(before[index], after[index])
            assert got[("appeared", site)] == pytest.approx(appeared)
            assert got[("disappeared", site)] == pytest.approx(disappeared)
            assert got[("signed", site)] == pytest.approx(appeared - disappeared)
            per_site.append(appeared)
        assert got[("appeared_mean", None)] == pytest.approx(sum(per_site) / 2)


def test_changes_ignore_training_summaries() -> None:
    plugin, state = ChangesPlugin(), {}
    train = StepSummary(step=0, source="train", sites=[summary_of("a", [1])])
    assert plugin.process(train, CTX, state, {}).measures == []
    assert state == {}


def test_jaccard_init_previous_and_final_backfill() -> None:
    plugin, state = JaccardPlugin(), {}
    stored = [probe_set(step, *rows) for step, rows in enumerate(STEPS)]
    results = [plugin.process(s, CTX, state, {}) for s in stored]
    assert values(results[0])[("jaccard_init", "a")] == 1.0
    for step in (1, 2):
        got = values(results[step])
        for index, site in enumerate("ab"):
            assert got[("jaccard_init", site)] == pytest.approx(
                brute_jaccard(STEPS[0][index], STEPS[step][index])
            )
            assert got[("jaccard_prev", site)] == pytest.approx(
                brute_jaccard(STEPS[step - 1][index], STEPS[step][index])
            )
    finished = plugin.process(
        RunFinished(final_step=2, summaries=lambda source: iter(stored)), CTX, state, {}
    )
    assert sorted(finished.backfill) == [0, 1, 2]
    for step in range(3):
        got = {(m.name, m.site): m.value for m in finished.backfill[step]}
        expected = [brute_jaccard(STEPS[step][i], STEPS[2][i]) for i in range(2)]
        assert got[("jaccard_final", "a")] == pytest.approx(expected[0])
        assert got[("jaccard_final", "b")] == pytest.approx(expected[1])
        assert got[("jaccard_final_mean", None)] == pytest.approx(sum(expected) / 2)
    assert got[("jaccard_final", "a")] == 1.0


def test_jaccard_state_stays_bounded() -> None:
    plugin, state = JaccardPlugin(), {}
    big = list(range(5000))
    plugin.process(probe_set(0, big, [1]), CTX, state, {})
    assert len(state["init"]["a"]["patterns"]) <= 1024
    assert state["init"]["a"]["exact"] is False


@pytest.mark.parametrize(
    ("rows", "unit_on", "dead", "always"),
    [(4, [0, 4, 2, 0], 0.5, 0.25), (3, [1, 2, 1], 0.0, 0.0), (2, [2, 2], 0.0, 1.0)],
)
def test_dead_and_always_on(rows: int, unit_on: list[int], dead: float, always: float) -> None:
    summary = SiteSummary(site="a", rows=rows, distinct=1, unit_on=unit_on)
    assert dead_and_always_on(summary) == {"dead": dead, "always_on": always}


def test_dead_units_from_explicit_masks() -> None:
    # rows x units masks; the brute force looks at each unit's column
    masks = {"a": [[1, 0, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0]], "b": [[0, 1, 1, 1], [1, 1, 0, 1]]}
    sites = [
        SiteSummary(
            site=name, rows=len(m), distinct=1, unit_on=[sum(c) for c in zip(*m, strict=True)]
        )
        for name, m in masks.items()
    ]
    got = values(DeadUnitsPlugin().process(StepSummary(step=3, sites=sites), CTX, {}, {}))
    for name, m in masks.items():
        columns = list(zip(*m, strict=True))
        assert got[("dead", name)] == sum(not any(c) for c in columns) / len(columns)
        assert got[("always_on", name)] == sum(all(c) for c in columns) / len(columns)
    assert got[("dead_mean", None)] == pytest.approx((2 / 4 + 0) / 2)


def test_apt_distance_and_temperature() -> None:
    probe = ProbeRecord(
        step=5,
        kind="apt",
        lr=0.1,
        sites=[
            SiteProbe(site="a", rows=8, etas=[0.1], changed=[2]),
            SiteProbe(site="b", rows=4, etas=[0.1], changed=[4]),
        ],
    )
    got = values(AptPlugin().process(probe, CTX, {}, {}))
    assert got[("D", "a")] == 0.25
    assert got[("T", "a")] == pytest.approx(-math.log(0.75))
    assert got[("D", "b")] == 1.0
    assert got[("T", "b")] == pytest.approx(math.log(8))  # D = 1 read as 1 - 1/(2n)
    assert got[("D_mean", None)] == pytest.approx(0.625)
    assert got[("T_mean", None)] == pytest.approx((-math.log(0.75) + math.log(8)) / 2)
    assert {m.source for m in AptPlugin().process(probe, CTX, {}, {}).measures} == {"apt"}
    assert temperature(0.0, 10) == 0.0
