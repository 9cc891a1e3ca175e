"""The ActCoolLR transition model and its fits, pure functions of (eta, P) pairs (thesis App. A.4).

Nothing here touches torch: a ``Measure`` (eta -> P) stands for "forward the step's batch with
the parameters that learning rate ``eta`` would have produced and return the fraction of
changed activation patterns". The scheduler (``monitor.schedulers.actcool``) supplies the real
one; tests supply synthetic curves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import erf, erfinv

logger = logging.getLogger(__name__)

Measure = Callable[[float], float]
Where = Literal["min", "max"]

# Table A.1 of the thesis, names as there.
ETA_MIN = 1e-10
REMEASURE_INIT = (0.25, 0.5, 0.75)
INITLRS = tuple(10.0**ell for ell in np.linspace(-4, 2, 25))
ERROR_NUM = 5
ERROR_MUTHRESH = 2.5
REMEASURE_JUMP = 2.0
MAX_WHILE_LOOP = 100
PROBING_STEP_SIZE = 8
# Appendix A.4: the search stops past this learning rate, the schedule calls anything above
# ETA_OUT_OF_RANGE (or NaN) a diverging run, invalid probabilities lie within EPSILON of 0 or 1,
# the schedule aims at SAFETY * P_wish, and the SVD keeps singular values within a factor
# SVD_TRUNCATION of the largest.
ETA_SEARCH_MAX = 1e300
ETA_OUT_OF_RANGE = 1e10
EPSILON = 1e-10
SAFETY = 0.99
SVD_TRUNCATION = 10.0
# Appendix A.4, step 1: the first guess of the model.
SIGMA_INIT = 1.0
MU_INIT = -1.0


def probability(eta: float, sigma: float, mu: float) -> float:
    """Forward model P(eta; sigma, mu) = (1 + erf((log eta - mu) / (sigma sqrt 2))) / 2 (Eq. 3.17).

    0 at eta = 0.
    """
    if eta <= 0:
        return 0.0
    return float(0.5 * (1.0 + erf((math.log(eta) - mu) / (sigma * math.sqrt(2.0)))))


def learning_rate(p: float, sigma: float, mu: float) -> float:
    """Inverse model eta(P; sigma, mu) = exp(sigma sqrt2 erfinv(2P - 1) + mu) (App. A.4 (b)).

    0 at P = 0, inf at P = 1, NaN outside [0, 1] or for a NaN model.
    """
    z = float(erfinv(2.0 * p - 1.0))
    with np.errstate(over="ignore"):
        return float(np.exp(sigma * math.sqrt(2.0) * z + mu))


def mu_of(eta: float, p: float, sigma: float) -> float:
    """Partial inverse mu = log eta - sigma sqrt2 erfinv(2P - 1) (App. A.4 (c), Eq. 3.44).

    The thesis prints Eq. 3.44 with the opposite signs of mu and log eta; this is the form that
    inverts the forward model, as Appendix A.4 (c) writes it.
    """
    return math.log(eta) - sigma * math.sqrt(2.0) * float(erfinv(2.0 * p - 1.0))


def valid(p: float, epsilon: float = EPSILON) -> bool:
    """Whether a measured probability can enter a fit (strictly inside (epsilon, 1 - epsilon))."""
    return epsilon < p < 1.0 - epsilon


def search_eta(
    measure: Measure,
    eta_near: float,
    p_near: float,
    p_exp: float,
    where: Where,
    *,
    remeasure_jump: float = REMEASURE_JUMP,
    max_while_loop: int = MAX_WHILE_LOOP,
    eta_min: float = ETA_MIN,
) -> tuple[list[float], list[float]]:
    """The bisection-like ``_search_eta`` of Appendix A.4: expand or shrink eta until P crosses.

    From (eta_near, p_near), eta is multiplied by ``remeasure_jump`` while P <= p_exp for
    ``where="max"`` (we want a point at or above the largest probability of interest) and
    divided by it while P >= p_exp for ``where="min"``, at most ``max_while_loop`` times, and
    never past eta_min or 1e300. Returns every (eta, P) seen, the start included when its P is
    neither 0 nor 1.

    The appendix prints the loop's *continue* condition under "check break condition" (read
    literally, ``where="min"`` would stop as soon as P >= p_exp, after its first division, and
    never bracket anything); the condition is used here as the loop condition, which is what
    the prose ("stops once we cross the desired bound") and the adjust rule describe.
    """
    etas: list[float] = []
    probs: list[float] = []
    if p_near not in (0.0, 1.0):
        etas.append(eta_near)
        probs.append(p_near)
    for _ in range(max_while_loop):
        going = (p_near <= p_exp and where == "max") or (p_near >= p_exp and where == "min")
        if not going or eta_near < eta_min or eta_near > ETA_SEARCH_MAX:
            break
        eta_near = eta_near * remeasure_jump if where == "max" else eta_near / remeasure_jump
        p_near = measure(eta_near)
        etas.append(eta_near)
        probs.append(p_near)
    return etas, probs


def fit(
    etas: Sequence[float], probs: Sequence[float], truncation: float = SVD_TRUNCATION
) -> tuple[float, float] | None:
    """(sigma, mu) by truncated-SVD least squares of log eta_i = sigma z_i + mu.

    z_i = sqrt2 erfinv(2 P_i - 1) linearises the model (App. A.4 step 4 (iv)). Singular values
    below the largest / ``truncation`` are dropped (the appendix's "threshold of 10"; we read it
    as a bound on the condition number). None when fewer than two valid pairs are given or the
    fit is not a model (sigma not positive and finite).
    """
    pairs = [(e, p) for e, p in zip(etas, probs, strict=True) if e > 0 and valid(p)]
    if len(pairs) < 2:
        return None
    z = math.sqrt(2.0) * erfinv(2.0 * np.array([p for _, p in pairs]) - 1.0)
    design = np.stack([z, np.ones_like(z)], axis=1)
    target = np.log([e for e, _ in pairs])
    u, s, vt = np.linalg.svd(design, full_matrices=False)
    keep = s >= s[0] / truncation
    coef = vt[keep].T @ ((u[:, keep].T @ target) / s[keep])
    sigma, mu = float(coef[0]), float(coef[1])
    if not (math.isfinite(sigma) and math.isfinite(mu)) or sigma <= 0:
        return None
    return sigma, mu


@dataclass
class FullUpdate:
    """What a full model update measured and decided."""

    etas: list[float]
    probs: list[float]
    model: tuple[float, float] | None
    used_grid: bool


def full_update(
    measure: Measure,
    sigma: float,
    mu: float,
    last: tuple[float, float] | None = None,
    *,
    remeasure_init: Sequence[float] = REMEASURE_INIT,
    initlrs: Sequence[float] = INITLRS,
    remeasure_jump: float = REMEASURE_JUMP,
    max_while_loop: int = MAX_WHILE_LOOP,
    eta_min: float = ETA_MIN,
    epsilon: float = EPSILON,
) -> FullUpdate:
    """Appendix A.4 step 4: collect (eta, P) pairs around the current model and refit it.

    (i) measure at eta(p; sigma, mu) for each p of ``remeasure_init``, plus ``last`` (the
    step's own (eta, P)) if given; (ii) drop P within ``epsilon`` of 0 or 1, and if nothing
    is left measure the ``initlrs`` grid instead; (iii) if the smallest P is above
    min(remeasure_init) search down from it, if the largest is below max(remeasure_init) search
    up from it (``search_eta``); (iv) ``fit`` all valid pairs. ``model`` is None when the fit
    failed; the caller keeps its old model then.
    """
    etas: list[float] = []
    probs: list[float] = []
    for p in remeasure_init:
        eta = learning_rate(p, sigma, mu)
        if math.isfinite(eta) and eta > 0:
            etas.append(eta)
            probs.append(measure(eta))
    if last is not None:
        etas.append(last[0])
        probs.append(last[1])
    kept = [(e, p) for e, p in zip(etas, probs, strict=True) if valid(p, epsilon)]
    used_grid = False
    if not kept:
        used_grid = True
        grid = [(float(eta), measure(float(eta))) for eta in initlrs]
        etas.extend(e for e, _ in grid)
        probs.extend(p for _, p in grid)
        kept = [(e, p) for e, p in grid if valid(p, epsilon)]
    if kept:
        low, high = min(remeasure_init), max(remeasure_init)
        eta_lo, p_lo = min(kept, key=lambda pair: pair[1])
        eta_hi, p_hi = max(kept, key=lambda pair: pair[1])
        if p_lo > low:
            more = search_eta(
                measure,
                eta_lo,
                p_lo,
                low,
                "min",
                eta_min=eta_min,
                remeasure_jump=remeasure_jump,
                max_while_loop=max_while_loop,
            )
            etas.extend(more[0][1:])
            probs.extend(more[1][1:])
        if p_hi < high:
            more = search_eta(
                measure,
                eta_hi,
                p_hi,
                high,
                "max",
                eta_min=eta_min,
                remeasure_jump=remeasure_jump,
                max_while_loop=max_while_loop,
            )
            etas.extend(more[0][1:])
            probs.extend(more[1][1:])
    usable = [(e, p) for e, p in zip(etas, probs, strict=True) if valid(p, epsilon)]
    model = fit([e for e, _ in usable], [p for _, p in usable])
    if model is None:
        logger.warning(
            "ActCoolLR: full update found %d usable (eta, P) pairs; model kept", len(usable)
        )
    return FullUpdate(etas, probs, model, used_grid)


def temperature_target(step: int, total_steps: int, t_start: float, gamma: float) -> float:
    """T(t) = T_start (1 - t / t_max)^gamma (Eq. 3.45), 0 from t_max on."""
    fraction = min(max(step / total_steps, 0.0), 1.0)
    return t_start * (1.0 - fraction) ** gamma


def probability_of_temperature(t: float) -> float:
    """P = 1 - 2^-T: the change probability of a temperature in bits (T_start 3.17 is D = 89%)."""
    return 1.0 - 2.0 ** (-t)


def temperature_of_probability(p: float) -> float:
    """T = -log2(1 - P), infinite at P = 1."""
    return math.inf if p >= 1.0 else -math.log2(1.0 - p)


@dataclass(frozen=True)
class FastUpdate:
    """The outcome of one measurement at the step's own learning rate."""

    mu: float
    error_count: int
    full: bool


def fast_update(
    sigma: float,
    mu: float,
    error_count: int,
    eta_now: float,
    p_now: float,
    *,
    error_num: int = ERROR_NUM,
    error_muthresh: float = ERROR_MUTHRESH,
) -> FastUpdate:
    """Appendix A.4 step 6: re-centre mu on (eta_now, P_now), or ask for a full update.

    P_now in {0, 1} asks for a full update (mu unchanged). Otherwise mu_new = ``mu_of``; a move
    larger than ``error_muthresh`` increments the error count, and the count reaching
    ``error_num`` asks for a full update (mu unchanged); else mu becomes mu_new, large move or
    not. The caller resets the count after a full update.
    """
    if not valid(p_now, 0.0):
        return FastUpdate(mu, error_count, True)
    mu_new = mu_of(eta_now, p_now, sigma)
    if abs(mu_new - mu) > error_muthresh:
        error_count += 1
        if error_count >= error_num:
            return FastUpdate(mu, error_count, True)
    return FastUpdate(mu_new, error_count, False)
