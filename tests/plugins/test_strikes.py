"""strikes 4.0 on synthetic training summaries: each rule, its band against a brute-force
median/MAD, the site quorum of the on-rate shift, its drift-following centre, and baselines
that take in a lasting change of level."""

from __future__ import annotations

import math
import statistics

import pytest
from plugin_fixtures import context

from monitor.schema import AlertValue, SiteSummary, StepSummary
from plugins.strikes import StrikeDetector, StrikeSettings

UNITS = 8
ROWS = 64
CTX = context({"a": UNITS, "b": UNITS, "c": UNITS})


def wobble(i: int) -> float:
    return 1.0 + 0.03 * math.sin(1.7 * i)


def site(name: str, on: list[int], rms: float = 1.0, top: float = 4.0) -> SiteSummary:
    return SiteSummary(
        site=name, rows=ROWS, distinct=1, unit_on=on, sumsq=rms * rms * ROWS * len(on), max_abs=top
    )


def steady_on(i: int) -> list[int]:
    return [32 + (i + u) % 3 for u in range(UNITS)]


FLIPPED = [60] * 4 + [2] * 4  # half the units turn from about half on to (nearly) all on or off


def step(
    i: int,
    *,
    loss: float | None = None,
    inputs: tuple[float, float] | None = None,
    on: dict[str, list[int]] | None = None,
) -> StepSummary:
    """A healthy step (everything wobbles a little), with the given statistics replaced."""
    w = wobble(i)
    rms, top = inputs if inputs is not None else (1.0 * w, 3.0 * w)
    counts = on or {}
    return StepSummary(
        step=i,
        source="train",
        sites=[site(n, counts.get(n, steady_on(i)), w, 4.0 * w) for n in "abc"],
        loss=0.5 * w if loss is None else loss,
        scalars={"lr/group0": 0.1, "input/rms": rms, "input/max_abs": top},
        sample_indices=[i],
    )


def alerts_of(steps: list[StepSummary], settings: StrikeSettings | None = None) -> list[AlertValue]:
    detector, state = StrikeDetector(settings), {}
    return [a for e in steps for a in detector.process(e, CTX, state, {}).alerts]


def brute_excess(history: list[float], x: float, floor: float) -> float:
    centre = statistics.median(history)
    mad = 1.4826 * statistics.median([abs(v - centre) for v in history])
    return abs(x - centre) / max(mad, floor)


@pytest.mark.parametrize("factor", [5.0, 0.2])
def test_inputs_scaled_both_ways_strike_on_their_rms(factor: float) -> None:
    w = wobble(60)
    bad = step(60, inputs=(factor * w, factor * 3.0 * w))
    alerts = alerts_of([*[step(i) for i in range(60)], bad, step(61), step(62)])
    assert [(a.step, a.evidence["signal"]) for a in alerts] == [(60, "input_rms")]
    history = [math.log(wobble(i)) for i in range(30, 60)]  # the last 30 clean values
    evidence = alerts[0].evidence["statistics"]["input_rms"]
    assert evidence["excess"] == pytest.approx(brute_excess(history, math.log(factor * w), 0.02))
    assert evidence["limit"] == 8.0
    assert "input_max_abs" in alerts[0].evidence["statistics"]  # it moved as far
    assert alerts[0].evidence["sample_indices"] == [60]


def test_one_outlying_input_value_strikes_on_the_largest_magnitude() -> None:
    bad = step(50, inputs=(wobble(50), 30.0))  # the RMS as usual, one value at 10x
    alerts = alerts_of([*[step(i) for i in range(50)], bad, step(51)])
    assert [(a.step, a.evidence["signal"]) for a in alerts] == [(50, "input_max_abs")]
    history = [math.log(3.0 * wobble(i)) for i in range(20, 50)]
    evidence = alerts[0].evidence["statistics"]["input_max_abs"]
    assert evidence["excess"] == pytest.approx(brute_excess(history, math.log(30.0), 0.05))


def test_site_scale_and_loss_still_strike() -> None:
    steps = [step(i) for i in range(70)]
    steps[40] = step(40, loss=8.0)
    big = step(60)
    big.sites[1] = site("b", steady_on(60), 6.0, 4.0 * wobble(60))  # one site's RMS x6
    steps[60] = big
    alerts = alerts_of(steps)
    assert [(a.step, a.evidence["signal"]) for a in alerts] == [(40, "loss"), (60, "rms")]
    assert set(alerts[1].evidence["statistics"]) == {"rms:b"}


def test_the_on_rate_shift_needs_half_the_sites() -> None:
    steps = [step(i) for i in range(80)]
    steps[50] = step(50, on={"a": FLIPPED})  # one site of three: not a strike
    steps[70] = step(70, on={"a": FLIPPED, "b": FLIPPED})  # two of three: a strike
    alerts = alerts_of(steps)
    assert [(a.step, a.evidence["signal"]) for a in alerts] == [(70, "shift")]
    assert set(alerts[0].evidence["statistics"]) == {"shift:a", "shift:b"}
    # Without the quorum, one site is enough (strikes 3.0's rule).
    one = alerts_of(steps, StrikeSettings(shift_quorum=0.0))
    assert [(a.step, a.evidence["signal"]) for a in one] == [(50, "shift"), (70, "shift")]


def drifting_on(i: int) -> list[int]:
    """On-counts that swing further each step: a shift that keeps rising (a rate warming up)."""
    swing = 1 + (i * i) // 4000  # 1 at step 0, 3 at step 90: the shift triples
    return [32 + swing * (-1) ** (i + u) for u in range(UNITS)]


def test_a_drifting_shift_is_followed_and_a_jump_on_top_of_it_strikes() -> None:
    steps = [step(i, on={n: drifting_on(i) for n in "abc"}) for i in range(100)]
    assert alerts_of(steps) == []
    flipped = step(100, on={n: [64, 0] * 4 for n in "abc"})
    assert [(a.step, a.evidence["signal"]) for a in alerts_of([*steps, flipped])] == [
        (100, "shift")
    ]


def test_a_lasting_change_of_level_becomes_the_new_baseline() -> None:
    steps = [step(i) for i in range(50)] + [step(i, loss=5.0 * wobble(i)) for i in range(50, 200)]
    alerts = alerts_of(steps)
    assert alerts and alerts[0].step == 50
    # the echo steps after each strike join the baselines, so the strikes stop within a window
    assert max(a.step for a in alerts) < 50 + 2 * 30
    assert all(a.evidence["signal"] == "loss" for a in alerts)


def test_a_summary_without_input_scalars_is_judged_on_the_rest() -> None:
    steps = [step(i).model_copy(update={"scalars": None}) for i in range(60)]
    steps[45] = steps[45].model_copy(update={"loss": 9.0})
    assert [(a.step, a.evidence["signal"]) for a in alerts_of(steps)] == [(45, "loss")]


def test_medians_mads_equal_the_one_window_rule() -> None:
    """The batched bands are exactly ``median_mad`` of each window, whatever their lengths."""
    import random

    from plugins._robust import median_mad, medians_mads

    rng = random.Random(3)
    windows = {
        f"k{i}": [rng.gauss(0, 1) for _ in range(n)] for i, n in enumerate([30, 30, 7, 1, 30, 8])
    }
    windows["empty"] = []
    bands = medians_mads(windows)
    assert set(bands) == set(windows) - {"empty"}
    for key, window in windows.items():
        if window:
            assert bands[key] == median_mad(window)
            centre = statistics.median(window)
            mad = 1.4826 * statistics.median([abs(v - centre) for v in window])
            assert bands[key] == pytest.approx((centre, mad), rel=1e-12, abs=1e-15)
