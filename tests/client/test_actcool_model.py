"""The ActCoolLR model maths (thesis App. A.4) on synthetic P(eta) curves, against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from monitor.schedulers import actcool_model as m


def erf_curve(sigma: float, mu: float):
    def measure(eta: float) -> float:
        return m.probability(eta, sigma, mu)

    return measure


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("mu", [-6.0, -1.0, 2.0])
def test_inverse_models_invert_the_forward_model(sigma: float, mu: float) -> None:
    for p in (1e-6, 0.01, 0.25, 0.5, 0.75, 0.99, 1 - 1e-6):
        eta = m.learning_rate(p, sigma, mu)
        assert m.probability(eta, sigma, mu) == pytest.approx(p, rel=1e-9, abs=1e-12)
        assert m.mu_of(eta, p, sigma) == pytest.approx(mu, abs=1e-9)
    for eta in (1e-5, 0.1, 1.0, 30.0):
        p = m.probability(eta, sigma, mu)
        if m.valid(p):
            assert m.learning_rate(p, sigma, mu) == pytest.approx(eta, rel=1e-6)
    # P(eta) is the normal CDF of log eta: brute-force check against a Riemann sum
    grid = np.linspace(mu - 12 * sigma, math.log(2.0), 200_001)
    density = np.exp(-((grid - mu) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    riemann = float(np.sum(density[:-1] * np.diff(grid)))
    assert m.probability(2.0, sigma, mu) == pytest.approx(riemann, abs=1e-4)


def test_inverse_edges() -> None:
    assert m.learning_rate(0.0, 1.0, 0.0) == 0.0
    assert m.learning_rate(1.0, 1.0, 0.0) == math.inf
    assert math.isnan(m.learning_rate(0.5, 1.0, math.nan))
    assert m.probability(0.0, 1.0, 0.0) == 0.0


@pytest.mark.parametrize("start", [1e-6, 1e-3, 1.0, 500.0])
def test_search_brackets_the_target_from_either_side(start: float) -> None:
    measure = erf_curve(0.8, -2.0)
    for where, target in (("max", 0.75), ("min", 0.25)):
        p_start = measure(start)
        etas, probs = m.search_eta(measure, start, p_start, target, where)
        assert probs == [measure(e) for e in etas]
        if (p_start > target) == (where == "max"):
            assert etas == ([start] if m.valid(p_start, 0.0) else [])  # already past
            continue
        crossed = probs[-1] >= target if where == "max" else probs[-1] <= target
        assert crossed
        if len(etas) >= 2:  # the point before the last was still on the wrong side
            before = probs[-2]
            assert before < target if where == "max" else before > target
            ratios = [b / a for a, b in itertools.pairwise(etas)]
            expected = 2.0 if where == "max" else 0.5
            assert ratios == pytest.approx([expected] * len(ratios))


def test_search_that_starts_past_the_bound_measures_nothing() -> None:
    calls: list[float] = []

    def measure(eta: float) -> float:
        calls.append(eta)
        return 0.5

    assert m.search_eta(measure, 1.0, 0.9, 0.75, "max") == ([1.0], [0.9])
    assert m.search_eta(measure, 1.0, 0.1, 0.25, "min") == ([1.0], [0.1])
    assert calls == []


def test_search_keeps_extreme_start_out_and_stops_at_its_bounds() -> None:
    flat = lambda eta: 0.0  # noqa: E731
    etas, probs = m.search_eta(flat, 1.0, 0.0, 0.75, "max", max_while_loop=7)
    assert len(etas) == 7 and etas[0] == 2.0 and probs == [0.0] * 7  # start (P = 0) left out
    etas, _ = m.search_eta(lambda eta: 1.0, 1e-8, 1.0, 0.25, "min", eta_min=1e-10)
    assert etas[-1] < 1e-10 <= etas[-2]  # one step past eta_min, then stop


def _brute_force_fit(etas: list[float], probs: list[float]) -> tuple[float, float]:
    """Grid search of the same least squares, log eta = sigma z + mu."""
    z = np.array([math.sqrt(2) * float(m.erfinv(2 * p - 1)) for p in probs])
    y = np.log(etas)
    sigmas = np.linspace(0.05, 4.0, 791)
    mus = np.linspace(-8.0, 4.0, 1201)
    residual = ((sigmas[:, None, None] * z + mus[None, :, None] - y) ** 2).sum(axis=2)
    i, j = np.unravel_index(np.argmin(residual), residual.shape)
    return float(sigmas[i]), float(mus[j])


def test_fit_matches_brute_force_least_squares() -> None:
    rng = np.random.default_rng(1)
    etas = list(np.exp(rng.uniform(-5, 1, 7)))
    probs = [min(max(m.probability(e, 1.3, -2.0) + rng.normal(0, 0.02), 0.01), 0.99) for e in etas]
    sigma, mu = m.fit(etas, probs)  # type: ignore[misc]
    ref_sigma, ref_mu = _brute_force_fit(etas, probs)
    assert sigma == pytest.approx(ref_sigma, abs=0.006)
    assert mu == pytest.approx(ref_mu, abs=0.011)


def test_fit_refuses_fewer_than_two_valid_points_and_a_non_model() -> None:
    assert m.fit([1.0, 2.0], [0.0, 0.5]) is None
    assert m.fit([1.0, 2.0], [0.6, 0.4]) is None  # falling P: sigma < 0 is no model


@pytest.mark.parametrize(("sigma", "mu"), [(0.7, -3.0), (1.5, 0.5), (0.4, -7.0)])
def test_full_update_recovers_a_noisy_erf_curve(sigma: float, mu: float) -> None:
    rng = np.random.default_rng(0)
    rows = 4000  # P measured as the changed fraction of 4000 rows: binomial noise

    def measure(eta: float) -> float:
        return float(rng.binomial(rows, m.probability(eta, sigma, mu)) / rows)

    result = m.full_update(measure, m.SIGMA_INIT, m.MU_INIT)
    assert result.model is not None
    fitted_sigma, fitted_mu = result.model
    assert fitted_sigma == pytest.approx(sigma, rel=0.1)
    assert fitted_mu == pytest.approx(mu, abs=0.15)
    kept = [p for p in result.probs if m.valid(p)]
    assert min(kept) <= 0.25 and max(kept) >= 0.75  # boundary measurements exist


def test_full_update_falls_back_to_the_initlrs_grid() -> None:
    # The first guess (sigma 1, mu -1) asks for eta ~ 0.2..0.7, where this curve is 1: all
    # invalid, so the 25-point grid 1e-4..1e2 is measured, then the bounds are searched.
    seen: list[float] = []

    def measure(eta: float) -> float:
        seen.append(eta)
        return float(np.round(m.probability(eta, 0.3, -6.0), 4))

    result = m.full_update(measure, m.SIGMA_INIT, m.MU_INIT)
    assert result.used_grid
    assert seen[3:28] == pytest.approx(list(m.INITLRS))
    assert result.model is not None
    assert result.model[0] == pytest.approx(0.3, rel=0.05)
    assert result.model[1] == pytest.approx(-6.0, abs=0.05)


def test_full_update_with_nothing_measurable_keeps_no_model() -> None:
    result = m.full_update(lambda eta: 0.0, 1.0, -1.0, initlrs=(1e-3, 1e-2))
    assert result.used_grid and result.model is None


def test_fast_update_corner_cases() -> None:
    # D = 0 and D = 1 ask for a full update and leave mu alone
    for p in (0.0, 1.0):
        assert m.fast_update(1.0, -1.0, 2, 0.5, p) == m.FastUpdate(-1.0, 2, True)
    # a small move re-centres mu exactly on the measurement
    update = m.fast_update(1.0, -1.0, 0, 0.5, 0.4)
    assert not update.full and update.error_count == 0
    assert m.probability(0.5, 1.0, update.mu) == pytest.approx(0.4)
    # a large move counts as an error but is taken, until error_num errors
    far = m.fast_update(1.0, 5.0, 3, 0.5, 0.4, error_num=5)
    assert far == m.FastUpdate(update.mu, 4, False)
    assert m.fast_update(1.0, 5.0, 4, 0.5, 0.4, error_num=5) == m.FastUpdate(5.0, 5, True)


def test_temperature_schedule() -> None:
    assert m.temperature_target(0, 100, 3.17, 1.0) == 3.17
    assert m.temperature_target(50, 100, 3.17, 2.0) == pytest.approx(3.17 / 4)
    assert m.temperature_target(100, 100, 3.17, 1.0) == 0.0
    assert m.temperature_target(150, 100, 3.17, 1.0) == 0.0
    assert m.probability_of_temperature(3.17) == pytest.approx(0.889, abs=1e-3)  # D = 89%
    assert m.temperature_of_probability(m.probability_of_temperature(1.7)) == pytest.approx(1.7)
    assert m.temperature_of_probability(1.0) == math.inf
    assert m.INITLRS[0] == pytest.approx(1e-4) and m.INITLRS[-1] == pytest.approx(1e2)
    assert len(m.INITLRS) == 25
