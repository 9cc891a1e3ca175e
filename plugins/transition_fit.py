"""Gaussian transition model D(eta) = Phi((ln eta - mu) / sigma) fitted to each sweep."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import FitValue, MeasureValue, ProbeRecord

logger = logging.getLogger(__name__)

MIN_POINTS = 3  # two parameters and at least one degree of freedom for the residual
SIGMA_BOUNDS = (1e-3, 1e3)


@dataclass(frozen=True)
class Fit:
    """One fit: ``ok`` False says why in ``reason`` and leaves the parameters None."""

    mu: float | None
    sigma: float | None
    residual: float | None
    points: int
    ok: bool
    reason: str = ""


def model(log_eta: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """P(eta) = 1/2 (1 + erf((ln eta - mu) / (sigma sqrt 2))) = Phi((ln eta - mu) / sigma)."""
    from scipy.special import ndtr  # imported at the first fit: see ``fit_transition``

    return np.asarray(ndtr((log_eta - mu) / sigma))


def fit_transition(etas: Sequence[float], ds: Sequence[float]) -> Fit:
    """Fit mu, sigma of the transition model to the (eta, D) pairs of one sweep.

    Thesis Sec. 3.2.3, Hypothesis 2, Eq. (3.17), fitted by non-linear least squares as in
    Fig. 3.12. Points with D in {0, 1} carry no information about the transition's position on
    the probit scale and are left out (SPEC "transition fit"). Start: ordinary least squares on
    the probit scale, Phi^-1(D) = (ln eta - mu) / sigma, a straight line in ln eta with slope
    1/sigma. Refinement: bounded non-linear least squares on D itself (scipy ``least_squares``,
    trust-region reflective), sigma in ``SIGMA_BOUNDS``, mu within ten spans of the swept ln eta.
    ``residual`` is the root-mean-square of D - P(eta) over the used points. Fewer than
    ``MIN_POINTS`` usable points, a non-finite input or an optimiser that does not converge give
    ``ok=False`` with the reason, never a guess.
    """
    pairs = [
        (math.log(e), d)
        for e, d in zip(etas, ds, strict=True)
        if e > 0 and math.isfinite(e) and math.isfinite(d) and 0.0 < d < 1.0
    ]
    n = len(pairs)
    if n < MIN_POINTS:
        return Fit(
            None, None, None, n, False, f"too few points with 0 < D < 1 ({n} < {MIN_POINTS})"
        )
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    if float(np.ptp(x)) == 0.0:
        return Fit(None, None, None, n, False, "every usable point has the same eta")
    span = float(np.ptp(x))
    mu_low, mu_high = float(x.min()) - 10 * span, float(x.max()) + 10 * span
    # scipy (0.5 s of imports) loads at the first fit, not with the plugins: sweeps are off by
    # default, and the embedded host's start competes with the training job for the CPU.
    from scipy.optimize import least_squares
    from scipy.special import ndtri

    slope, intercept = np.polyfit(x, ndtri(y), 1)
    if slope > 0:
        mu0, sigma0 = -intercept / slope, 1.0 / slope
    else:  # D does not rise with eta on the probit scale: start from the swept range's middle
        mu0, sigma0 = float(np.median(x)), span
    mu0 = float(np.clip(mu0, mu_low, mu_high))
    sigma0 = float(np.clip(sigma0, *SIGMA_BOUNDS))
    try:
        solution = least_squares(
            lambda p: model(x, p[0], p[1]) - y,
            x0=[mu0, sigma0],
            bounds=([mu_low, SIGMA_BOUNDS[0]], [mu_high, SIGMA_BOUNDS[1]]),
            method="trf",
        )
    except (ValueError, FloatingPointError) as error:
        return Fit(None, None, None, n, False, f"fit failed: {error}")
    if not solution.success:
        return Fit(None, None, None, n, False, f"fit did not converge: {solution.message}")
    mu, sigma = float(solution.x[0]), float(solution.x[1])
    residual = float(np.sqrt(np.mean(solution.fun**2)))
    if not (math.isfinite(mu) and math.isfinite(sigma) and math.isfinite(residual)):
        return Fit(None, None, None, n, False, "fit produced non-finite parameters")
    return Fit(mu, sigma, residual, n, True)


class TransitionFitPlugin:
    """Transition fits of each sweep probe, per site and for the mean over sites.

    The mean over sites is D_mean(eta) = mean_l D_l(eta) (thesis Sec. 3.2.3: "the average over
    all layers").
    Emits one ``FitValue`` per site plus one with ``site=None`` for the mean, and the measures
    ``mu``/``sigma``/``residual`` per site and ``mu_mean``/``sigma_mean``/``residual_mean``
    (source ``sweep``) for every fit that succeeded. Other plugins read ``result.fits``.
    """

    name = "transition_fit"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Fits of a sweep ProbeRecord; other events produce nothing."""
        if not isinstance(event, ProbeRecord) or event.kind != "sweep":
            return PluginResult()
        result = PluginResult()
        by_eta: dict[float, list[float]] = {}
        for site in event.sites:
            ds = [c / site.rows for c in site.changed]
            self._add(result, site.site, fit_transition(site.etas, ds), "")
            for eta, d in zip(site.etas, ds, strict=True):
                by_eta.setdefault(eta, []).append(d)
        if by_eta:
            etas = sorted(by_eta)
            means = [math.fsum(by_eta[e]) / len(by_eta[e]) for e in etas]
            self._add(result, None, fit_transition(etas, means), "_mean")
        return result

    @staticmethod
    def _add(result: PluginResult, site: str | None, fit: Fit, suffix: str) -> None:
        result.fits.append(
            FitValue(
                site=site,
                mu=fit.mu,
                sigma=fit.sigma,
                residual=fit.residual,
                points=fit.points,
                ok=fit.ok,
                reason=fit.reason,
            )
        )
        if fit.ok:
            for name, value in (("mu", fit.mu), ("sigma", fit.sigma), ("residual", fit.residual)):
                assert value is not None
                result.measures.append(
                    MeasureValue(name=f"{name}{suffix}", value=value, site=site, source="sweep")
                )
        result.measures.append(
            MeasureValue(
                name=f"fit_points{suffix}", value=float(fit.points), site=site, source="sweep"
            )
        )
