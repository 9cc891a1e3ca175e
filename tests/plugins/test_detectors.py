"""Divergence and strike detectors on synthetic event streams whose truth is known."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest
from plugin_fixtures import context

from monitor.measures import RunFinished
from monitor.schema import AlertValue, ProbeRecord, SiteProbe, SiteSummary, StepSummary
from plugins.divergence import DivergenceDetector
from plugins.strikes import StrikeDetector, StrikeSettings
from plugins.transition_fit import TransitionFitPlugin

ETAS = [float(e) for e in np.logspace(-3, 2, 16)]
ROWS = 10_000
CTX = context({"a": 8, "b": 8, "c": 8})


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def sweep(step: int, sigma: float, mu: float = -1.0, lr: float = 0.01) -> ProbeRecord:
    changed = [round(phi((math.log(e) - mu) / sigma) * ROWS) for e in ETAS]
    sites = [SiteProbe(site=s, rows=ROWS, etas=ETAS, changed=changed) for s in "abc"]
    return ProbeRecord(step=step, kind="sweep", lr=lr, sites=sites)


def apt(step: int, changed: list[int], rows: int = 64) -> ProbeRecord:
    sites = [
        SiteProbe(site=s, rows=rows, etas=[0.1], changed=[c])
        for s, c in zip("abc", changed, strict=True)
    ]
    return ProbeRecord(step=step, kind="apt", lr=0.1, sites=sites)


class Pipeline:
    """The transition fit feeding the divergence detector, as the host wires them."""

    def __init__(self) -> None:
        self.fit, self.detector = TransitionFitPlugin(), DivergenceDetector()
        self.fit_state: dict = {}
        self.state: dict = {}

    def __call__(self, event: ProbeRecord | StepSummary):
        upstream = {"transition_fit": self.fit.process(event, CTX, self.fit_state, {})}
        return self.detector.process(event, CTX, self.state, upstream).alerts


def wobble(i: int) -> float:
    return 1.0 + 0.03 * math.sin(1.7 * i)


def test_sigma_rise_alerts_with_evidence_after_it_persists() -> None:
    run = Pipeline()
    for i in range(12):
        assert run(sweep(5 * i, wobble(i))) == []
    assert run(sweep(60, 2.0)) == []  # one sweep outside the band is not enough
    alerts = run(sweep(65, 2.1))
    assert alerts and {a.kind for a in alerts} == {"divergence"}
    mean = next(a for a in alerts if a.site is None and a.evidence["signal"] == "sigma")
    series = [wobble(i) for i in range(1, 12)] + [2.0]
    expected_band = statistics.median(series[-12:])
    assert mean.evidence["median"] == pytest.approx(expected_band, abs=1e-3)
    assert mean.evidence["threshold"] >= 1.5 * mean.evidence["median"] - 1e-9
    assert mean.evidence["sigma"] == pytest.approx(2.1, abs=1e-3)
    assert len(mean.evidence["series"]) == 12 and mean.evidence["steps"][-1] == 60.0
    assert {a.site for a in alerts if a.evidence["signal"] == "sigma"} == {None, "a", "b", "c"}


def test_stable_or_falling_sigma_is_quiet() -> None:
    run = Pipeline()
    for i in range(40):
        assert run(sweep(5 * i, wobble(i) * (1 - 0.01 * i))) == []


def test_position_jump_of_the_used_rate_alerts() -> None:
    run = Pipeline()
    for i in range(10):
        assert run(sweep(5 * i, 1.0, lr=0.01)) == []
    run(sweep(50, 1.0, lr=0.2))  # z rises by ln(20) = 3 > 1.5
    alerts = run(sweep(55, 1.0, lr=0.2))
    assert [a.evidence["signal"] for a in alerts] == ["position"]
    assert alerts[0].evidence["z"] == pytest.approx(math.log(0.2) + 1.0, abs=1e-3)


def test_hard_signs() -> None:
    run = Pipeline()
    nonfinite = apt(3, [1, 1, 1]).model_copy(update={"nonfinite": True})
    assert [a.severity for a in run(nonfinite)] == ["critical"]
    summary = StepSummary(
        step=4, sites=[SiteSummary(site="a", rows=2, distinct=1, nonfinite_rows=1)]
    )
    assert run(summary)[0].evidence["sites"] == ["a"]
    # D = 1 on every site for four APT probes in a row; a partial saturation resets the count
    assert all(run(apt(s, [64, 64, 64])) == [] for s in (5, 6, 7))
    assert run(apt(8, [64, 63, 64])) == []
    assert all(run(apt(s, [64, 64, 64])) == [] for s in (9, 10, 11))
    assert "D = 1" in run(apt(12, [64, 64, 64]))[0].message


def test_fit_that_stops_converging_is_a_hard_sign() -> None:
    run = Pipeline()
    run(sweep(0, 1.0))
    saturated = ProbeRecord(
        step=5,
        kind="sweep",
        lr=0.01,
        sites=[SiteProbe(site=s, rows=ROWS, etas=ETAS, changed=[ROWS] * 16) for s in "abc"],
    )
    assert run(saturated) == []
    alerts = run(saturated.model_copy(update={"step": 10}))
    assert "no longer converges" in alerts[0].message
    assert "too few points" in alerts[0].evidence["reason"]


def d_series(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(rng.binomial(64, p)) for p in (0.1, 0.3, 0.5)] for _ in range(n)]


def strike_sites(alert: AlertValue) -> dict[str, dict[str, Any]]:
    """The per-site evidence of a strike alert."""
    return cast(dict[str, dict[str, Any]], alert.evidence["sites"])


def strike_run(
    series: list[list[int]],
    settings: StrikeSettings | None = None,
    indices: bool = True,
    summary_first: bool = True,
) -> tuple[list[AlertValue], dict[str, Any]]:
    detector, state = StrikeDetector(settings), dict[str, Any]()
    alerts: list[AlertValue] = []
    for step, changed in enumerate(series):
        summary = StepSummary(
            step=step, sites=[], sample_indices=[step, step + 1000] if indices else None
        )
        probe = apt(step, changed)
        events: list[StepSummary | ProbeRecord] = (
            [summary, probe] if summary_first else [probe, summary]
        )
        for event in events:
            alerts += detector.process(event, CTX, state, {}).alerts
    return alerts, state


@pytest.mark.parametrize("summary_first", [True, False])
def test_strike_in_most_sites_alerts_with_the_batch_indices(summary_first: bool) -> None:
    series = d_series(60, 0)
    series[40] = [50, 60, 64]
    alerts, _ = strike_run(series, summary_first=summary_first)
    assert [a.step for a in alerts] == [40]
    assert alerts[0].kind == "bad_batch"
    assert alerts[0].evidence["sample_indices"] == [40, 1040]
    sites = strike_sites(alerts[0])
    assert set(sites) == {"a", "b", "c"}
    # brute force: the baseline is the temperature of the 30 steps before
    baseline = [-math.log(1 - min(row[0] / 64, 1 - 1 / 128)) for row in series[10:40]]
    centre = statistics.median(baseline)
    mad = 1.4826 * statistics.median(abs(t - centre) for t in baseline)
    assert sites["a"]["T_median"] == pytest.approx(centre)
    assert sites["a"]["T_threshold"] == pytest.approx(centre + max(5 * mad, 0.7))
    assert sites["a"]["D"] == 50 / 64


def test_spike_in_one_site_or_during_warmup_is_not_a_strike() -> None:
    series = d_series(60, 1)
    series[5] = [60, 60, 64]  # before the baseline has warmed up
    series[30] = [60, 19, 32]  # one site only
    alerts, state = strike_run(series)
    assert alerts == []
    window = StrikeSettings().window
    assert all(len(v) <= window for site in state["baseline"].values() for v in site.values())


def test_strike_without_indices_and_its_echo_is_not_counted() -> None:
    series = d_series(60, 2)
    series[40] = [40, 60, 64]
    series[41] = [40, 60, 64]  # the next two steps are within the refractory period
    series[42] = [40, 60, 64]
    alerts, _ = strike_run(series, indices=False, summary_first=False)
    assert [a.step for a in alerts] == [40]
    assert alerts[0].evidence["sample_indices"] is None


def test_quiet_noise_gives_no_strikes() -> None:
    for seed in range(5):
        alerts, _ = strike_run(d_series(200, 10 + seed))
        assert alerts == []


# ---- strikes from the training summaries: explicit rows, brute-force statistics ----

UNITS = 8


def rows_summary(site: str, rows: list[tuple[int, ...]]) -> SiteSummary:
    """The wire summary of explicit 0/1 rows: every pattern, its spectrum and per-unit on counts."""
    counts: dict[int, int] = {}
    for row in rows:
        fp = sum(bit << i for i, bit in enumerate(row))
        counts[fp] = counts.get(fp, 0) + 1
    spectrum: dict[int, int] = {}
    for c in counts.values():
        spectrum[c] = spectrum.get(c, 0) + 1
    return SiteSummary(
        site=site,
        rows=len(rows),
        distinct=len(counts),
        spectrum=sorted(spectrum.items()),
        patterns=sorted(counts.items()),
        unit_on=[sum(row[u] for row in rows) for u in range(len(rows[0]))],
    )


def batch_rows(rng: np.random.Generator, rates: list[float], n: int = 64) -> list[tuple[int, ...]]:
    return [tuple(int(rng.random() < p) for p in rates) for _ in range(n)]


RATES = {s: [0.2 + 0.08 * u + 0.02 * i for u in range(UNITS)] for i, s in enumerate("abc")}


Rows = list[tuple[int, ...]]


def summary_series(n: int, seed: int, bad: dict[int, str]) -> list[dict[str, Rows]]:
    """Per step and site, the training batch's rows; ``bad`` steps are "flipped" (every unit's
    on-rate p becomes 1 - p, a batch of another scale) or "constant" (one pattern for all rows)."""
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(n):
        per_site = {}
        for site, rates in RATES.items():
            if bad.get(step) == "flipped":
                per_site[site] = batch_rows(rng, [1 - p for p in rates])
            elif bad.get(step) == "constant":
                per_site[site] = [tuple(1 for _ in rates)] * 64
            else:
                per_site[site] = batch_rows(rng, rates)
        steps.append(per_site)
    return steps


def no_replay(source: str) -> Iterator[StepSummary]:
    return iter(())


def summary_strikes(steps: list[dict[str, Rows]]) -> list[AlertValue]:
    """Feed training summaries only (no APT probes); the last step is judged at the run's end."""
    detector, state, alerts = StrikeDetector(), dict[str, Any](), list[AlertValue]()
    for step, per_site in enumerate(steps):
        sites = [rows_summary(s, rows) for s, rows in per_site.items()]
        event = StepSummary(step=step, sites=sites, sample_indices=[step])
        alerts += detector.process(event, CTX, state, {}).alerts
    alerts += detector.process(RunFinished(len(steps) - 1, no_replay), CTX, state, {}).alerts
    return alerts


def brute_shift(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> float:
    """(1/d) sum_u |on-rate of u in a - on-rate of u in b|."""
    d = len(a[0])
    rate_a = [sum(r[u] for r in a) / len(a) for u in range(d)]
    rate_b = [sum(r[u] for r in b) / len(b) for u in range(d)]
    return sum(abs(x - y) for x, y in zip(rate_a, rate_b, strict=True)) / d


def brute_rel_entropy(rows: list[tuple[int, ...]]) -> float:
    """H / min(d, log2 n) from the explicit rows."""
    n = len(rows)
    counts: dict[tuple[int, ...], int] = {}
    for row in rows:
        counts[row] = counts.get(row, 0) + 1
    h = -sum(c / n * math.log2(c / n) for c in counts.values())
    return h / min(len(rows[0]), math.log2(n))


def test_on_rate_shift_in_every_site_is_a_strike_with_brute_force_evidence() -> None:
    steps = summary_series(80, 3, {50: "flipped"})
    alerts = summary_strikes(steps)
    assert [a.step for a in alerts] == [50]
    assert alerts[0].evidence["sample_indices"] == [50]
    assert set(strike_sites(alerts[0])) == {"a", "b", "c"}
    # brute force: the shift of each step against the one before, over the 30 steps before 50
    a = [steps[t]["a"] for t in range(80)]
    history = [brute_shift(a[t], a[t - 1]) for t in range(20, 50)]
    centre = statistics.median(history)
    mad = 1.4826 * statistics.median(abs(x - centre) for x in history)
    evidence = strike_sites(alerts[0])["a"]
    assert evidence["shift"] == pytest.approx(brute_shift(a[50], a[49]))
    assert evidence["shift_median"] == pytest.approx(centre)
    assert evidence["shift_threshold"] == pytest.approx(centre + max(5 * mad, 0.05))


def test_constant_batch_collapses_the_entropy_and_is_a_strike() -> None:
    steps = summary_series(80, 4, {45: "constant", 70: "constant"})
    alerts = summary_strikes(steps)
    assert [a.step for a in alerts] == [45, 70]
    evidence = strike_sites(alerts[0])["b"]
    assert evidence["rel_entropy"] == pytest.approx(brute_rel_entropy(steps[45]["b"])) == 0.0
    history = [brute_rel_entropy(steps[t]["b"]) for t in range(15, 45)]
    assert evidence["rel_entropy_median"] == pytest.approx(statistics.median(history))


def test_bad_batch_in_the_last_step_is_judged_at_the_end_of_the_run() -> None:
    assert [a.step for a in summary_strikes(summary_series(40, 5, {39: "flipped"}))] == [39]


def test_lasting_regime_change_alerts_once_then_the_baseline_follows() -> None:
    steps = summary_series(120, 6, {})
    regime = summary_series(60, 7, {s: "flipped" for s in range(60)})
    alerts = summary_strikes(steps[:60] + regime)
    assert [a.step for a in alerts] == [60]


def test_quiet_summaries_give_no_strikes() -> None:
    for seed in range(3):
        assert summary_strikes(summary_series(150, 20 + seed, {})) == []


def test_shift_in_one_site_only_is_not_a_strike() -> None:
    steps = summary_series(60, 8, {})
    steps[40]["a"] = batch_rows(np.random.default_rng(0), [1 - p for p in RATES["a"]])
    assert summary_strikes(steps) == []


def test_sites_only_just_out_of_band_are_not_a_strike() -> None:
    series = d_series(60, 9)
    _, state = strike_run(series[:40])
    just_out = []
    for site in "abc":  # per site the smallest D whose T is above its band, by brute force
        history = state["baseline"][site]["T"]
        centre = statistics.median(history)
        band = max(5 * 1.4826 * statistics.median(abs(t - centre) for t in history), 0.7)
        temps = [-math.log(1 - min(c / 64, 1 - 1 / 128)) for c in range(65)]
        c = next(c for c in range(65) if temps[c] > centre + band)
        assert temps[c] < centre + 2.5 * band  # out of band, but not decisively
        just_out.append(c)
    assert strike_run([*series[:40], just_out, *series[41:]])[0] == []
    loose = strike_run([*series[:40], just_out, *series[41:]], StrikeSettings(decisive=1.0))[0]
    assert [a.step for a in loose] == [40] and set(strike_sites(loose[0])) == {"a", "b", "c"}


def test_a_late_event_of_a_step_already_judged_is_ignored() -> None:
    series = d_series(45, 11)
    series[40] = [50, 60, 64]
    detector, state = StrikeDetector(), dict[str, Any]()
    alerts: list[AlertValue] = []
    for step, changed in enumerate(series):
        summary = StepSummary(step=step, sites=[], sample_indices=[step])
        for event in (apt(step, changed), summary):
            alerts += detector.process(event, CTX, state, {}).alerts
    before = json.dumps(state, sort_keys=True)
    assert detector.process(apt(40, series[40]), CTX, state, {}).alerts == []
    assert json.dumps(state, sort_keys=True) == before
    assert [a.step for a in alerts] == [40]
