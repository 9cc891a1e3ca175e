"""The transition fit against the model it fits and a brute-force grid search."""

from __future__ import annotations

import math

import numpy as np
import pytest
from plugin_fixtures import context

from monitor.schema import ProbeRecord, SiteProbe
from plugins.transition_fit import TransitionFitPlugin, fit_transition

ETAS = [float(e) for e in np.logspace(-3, 2, 16)]


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def curve(mu: float, sigma: float, etas: list[float] = ETAS) -> list[float]:
    return [phi((math.log(e) - mu) / sigma) for e in etas]


def grid_fit(etas: list[float], ds: list[float]) -> tuple[float, float, float]:
    """Brute force: least squares over a fine (mu, sigma) grid on the usable points."""
    pts = [(math.log(e), d) for e, d in zip(etas, ds, strict=True) if 0 < d < 1]
    best = (math.inf, 0.0, 0.0)
    for mu in np.linspace(-6, 4, 201):
        for sigma in np.linspace(0.2, 4, 191):
            sse = sum((phi((x - mu) / sigma) - d) ** 2 for x, d in pts)
            best = min(best, (sse, float(mu), float(sigma)))
    return best[1], best[2], math.sqrt(best[0] / len(pts))


@pytest.mark.parametrize(("mu", "sigma"), [(-2.0, 1.0), (0.5, 2.5), (-4.0, 0.6)])
def test_recovers_exact_curves(mu: float, sigma: float) -> None:
    fit = fit_transition(ETAS, curve(mu, sigma))
    assert fit.ok and fit.reason == ""
    assert fit.mu == pytest.approx(mu, abs=1e-5)
    assert fit.sigma == pytest.approx(sigma, abs=1e-5)
    assert fit.residual == pytest.approx(0.0, abs=1e-6)


def test_matches_grid_search_on_noisy_counts() -> None:
    rng = np.random.default_rng(0)
    rows = 200
    ds = [rng.binomial(rows, p) / rows for p in curve(-1.0, 1.4)]
    fit = fit_transition(ETAS, ds)
    mu, sigma, residual = grid_fit(ETAS, ds)
    assert fit.ok
    assert fit.mu == pytest.approx(mu, abs=0.06)
    assert fit.sigma == pytest.approx(sigma, abs=0.03)
    assert fit.residual is not None and fit.residual <= residual + 1e-9


def test_points_at_zero_or_one_are_left_out() -> None:
    ds = [0.0, 0.0, 0.0, *curve(-1.0, 1.0, ETAS[3:-3]), 1.0, 1.0, 1.0]
    fit = fit_transition(ETAS, ds)
    assert fit.points == len(ETAS) - 6
    assert fit.mu == pytest.approx(-1.0, abs=1e-5)


def test_too_few_points_says_so() -> None:
    fit = fit_transition(ETAS[:4], [0.0, 0.3, 0.6, 1.0])
    assert not fit.ok and fit.mu is None and fit.sigma is None
    assert fit.points == 2 and "too few points" in fit.reason


def test_plugin_fits_every_site_and_the_mean() -> None:
    d_a, d_b = curve(-1.0, 1.0), curve(-2.0, 1.5)
    rows = 10_000
    probe = ProbeRecord(
        step=10,
        kind="sweep",
        lr=0.1,
        sites=[
            SiteProbe(site="a", rows=rows, etas=ETAS, changed=[round(d * rows) for d in d_a]),
            SiteProbe(site="b", rows=rows, etas=ETAS, changed=[round(d * rows) for d in d_b]),
        ],
    )
    result = TransitionFitPlugin().process(probe, context({"a": 4, "b": 4}), {}, {})
    fits = {f.site: f for f in result.fits}
    assert set(fits) == {"a", "b", None}
    assert fits["a"].mu == pytest.approx(-1.0, abs=0.01)
    assert fits["b"].sigma == pytest.approx(1.5, abs=0.01)
    mean_fit = fit_transition(
        ETAS,
        [(round(a * rows) + round(b * rows)) / (2 * rows) for a, b in zip(d_a, d_b, strict=True)],
    )
    assert fits[None].mu == pytest.approx(mean_fit.mu)
    names = {(m.name, m.site) for m in result.measures}
    assert {("mu", "a"), ("sigma", "b"), ("mu_mean", None), ("sigma_mean", None)} <= names
    assert {m.source for m in result.measures} == {"sweep"}
    apt = probe.model_copy(update={"kind": "apt"})
    assert TransitionFitPlugin().process(apt, context({}), {}, {}).fits == []
