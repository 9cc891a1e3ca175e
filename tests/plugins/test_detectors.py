"""Divergence and strike detectors on synthetic event streams whose truth is known."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from plugin_fixtures import context

from monitor.schema import ProbeRecord, SiteProbe, SiteSummary, StepSummary
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
    # D = 1 on every site for three APT probes in a row; a partial saturation resets the count
    assert run(apt(5, [64, 64, 64])) == [] and run(apt(6, [64, 64, 64])) == []
    assert run(apt(7, [64, 63, 64])) == []
    assert run(apt(8, [64, 64, 64])) == [] and run(apt(9, [64, 64, 64])) == []
    assert "D = 1" in run(apt(10, [64, 64, 64]))[0].message


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


def strike_run(series: list[list[int]], indices: bool = True, summary_first: bool = True):
    detector, state, alerts = StrikeDetector(), {}, []
    for step, changed in enumerate(series):
        summary = StepSummary(
            step=step, sites=[], sample_indices=[step, step + 1000] if indices else None
        )
        events = [summary, apt(step, changed)] if summary_first else [apt(step, changed), summary]
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
    sites = alerts[0].evidence["sites"]
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
    assert all(len(v) <= StrikeSettings().window for v in state["baseline"].values())


def test_strike_without_indices_and_its_echo_is_not_counted() -> None:
    series = d_series(60, 2)
    series[40] = [40, 60, 64]
    series[41] = [40, 60, 64]  # the next step is within the refractory period
    alerts, _ = strike_run(series, indices=False, summary_first=False)
    assert [a.step for a in alerts] == [40]
    assert alerts[0].evidence["sample_indices"] is None


def test_quiet_noise_gives_no_strikes() -> None:
    for seed in range(5):
        alerts, _ = strike_run(d_series(200, 10 + seed))
        assert alerts == []
