r"""Weighted Jaccard and pattern changes between two site summaries, exact or from bottom-k samples.

A ``SiteSummary`` carries every ``(fingerprint, count)`` pair when ``patterns_exact`` is set, and
otherwise the bottom-k sample: the k smallest fingerprints (unsigned order) with their exact counts.
Fingerprints are a well-mixed 64-bit hash of the pattern (``monitor.client.patterns``), so the
patterns whose fingerprint lies at or below a threshold tau are a uniform random sample of all
patterns, and the same pattern has the same fingerprint at every step.

**The estimator.** Let tau_a be the largest fingerprint kept for summary a (infinity when a is
exact), likewise tau_b, and tau = min(tau_a, tau_b). Every pattern of the union A u B whose
fingerprint is <= tau is in the union of both samples, and for each of them the counts in *both*
summaries are known exactly (a pattern <= tau_a that is missing from a's sample is missing from
A). This set U is therefore a uniform sample (without replacement) of the union's distinct patterns,
of size m = |U| >= min(k_a, k_b) (Broder 1997; Cohen & Kaplan 2007, "bottom-k sketches"). From it:

- weighted Jaccard (Ruzicka) J = sum_i min(c_i, c'_i) / sum_i max(c_i, c'_i) is estimated by the
  ratio estimator sum_U min / sum_U max;
- pattern changes |B \\ A| / |A| and |A \\ B| / |A| by q_new / (q_old + q_both) and
  q_old / (q_old + q_both), where q_new, q_old, q_both are the fractions of U found only in B, only
  in A, and in both.

**Its error.** Both are ratio estimators over a uniform sample of m of the N = |A u B| patterns.
To first order their standard error is sqrt((1 - m/N) / m) * s_e / mean(y), where y is the
denominator term (max_i, resp. the indicator "in A") and s_e the standard deviation of the
residuals e_i = x_i - R y_i (x the numerator term, R the true ratio) (Cochran, "Sampling
Techniques", Sec. 6.3). For changes this is at most about 1 / sqrt(m) relative to the changed share
plus the (1 - m/N) finite-population correction; for weighted Jaccard it grows with the spread of
the counts: a few very frequent patterns that fall outside the sample move the estimate most.
With both summaries exact (m = N) the error is zero and the values are exact.
"""

from __future__ import annotations

import math

from monitor.schema import SiteSummary

_NO_LIMIT = 2**64  # larger than every fingerprint


def _threshold(summary: SiteSummary) -> int:
    """Largest fingerprint the summary vouches for: everything <= it is listed exactly."""
    if summary.patterns_exact:
        return _NO_LIMIT
    if not summary.patterns:
        return -1
    return max(fp for fp, _ in summary.patterns)


def _require_patterns(summary: SiteSummary) -> None:
    if summary.rows > 0 and not summary.patterns:
        raise ValueError(f"summary of site {summary.site!r} carries no patterns")


def joint_sample(a: SiteSummary, b: SiteSummary) -> list[tuple[int, int, int]]:
    """The joint sample U of the module docstring, as ``(fingerprint, count_a, count_b)``.

    It holds every union pattern whose fingerprint is at or below both thresholds (all of them
    when both summaries are exact).
    """
    _require_patterns(a)
    _require_patterns(b)
    tau = min(_threshold(a), _threshold(b))
    counts_a = {fp: c for fp, c in a.patterns if fp <= tau}
    counts_b = {fp: c for fp, c in b.patterns if fp <= tau}
    return [
        (fp, counts_a.get(fp, 0), counts_b.get(fp, 0))
        for fp in sorted(counts_a.keys() | counts_b.keys())
    ]


def is_exact(a: SiteSummary, b: SiteSummary) -> bool:
    """True when both summaries list every pattern, so the values below are exact."""
    return a.patterns_exact and b.patterns_exact


def weighted_jaccard(a: SiteSummary, b: SiteSummary) -> float:
    """Weighted Jaccard (Ruzicka) similarity sum_i min(c_i, c'_i) / sum_i max(c_i, c'_i).

    Hartmann et al. 2021, Sec. 2.2; thesis Eq. (3.7). Exact when both summaries are exact, else the
    bottom-k ratio estimate of the module docstring. Two summaries of no rows are equal (1.0).
    """
    sample = joint_sample(a, b)
    larger = sum(max(ca, cb) for _, ca, cb in sample)
    if larger == 0:
        return 1.0
    return sum(min(ca, cb) for _, ca, cb in sample) / larger


def pattern_changes(a: SiteSummary, b: SiteSummary) -> dict[str, float]:
    """Pattern changes from a to b: appeared, disappeared, signed.

    ``appeared`` counts patterns in b and not in a, ``disappeared`` those in a and not in b, each
    divided by distinct(a); ``signed`` = appeared - disappeared.

    Hartmann et al. 2021, Sec. 2.2 ("pattern changes"); thesis Eq. (3.6). Exact when both
    summaries are exact (then signed = (distinct(b) - distinct(a)) / distinct(a)); otherwise
    estimated from the joint bottom-k sample. ``a`` must have at least one row.
    """
    if a.distinct == 0:
        raise ValueError("pattern changes are relative to the earlier summary, which has no rows")
    sample = joint_sample(a, b)
    # With both exact, ``old`` is every pattern of a, i.e. distinct(a): the same formula is exact.
    new = sum(1 for _, ca, cb in sample if ca == 0 and cb > 0)
    old = sum(1 for _, ca, cb in sample if ca > 0)
    gone = sum(1 for _, ca, cb in sample if ca > 0 and cb == 0)
    if old == 0:
        raise ValueError("the joint sample holds no pattern of the earlier summary")
    appeared, disappeared = new / old, gone / old
    return {"appeared": appeared, "disappeared": disappeared, "signed": appeared - disappeared}


def truncate(summary: SiteSummary, k: int) -> SiteSummary:
    """The summary with at most ``k`` patterns kept.

    The bottom-k of what it carries is a valid (smaller) bottom-k sample of the same patterns.
    Used to keep plugin state bounded.
    """
    if len(summary.patterns) <= k:
        return summary
    kept = sorted(summary.patterns)[:k]
    return summary.model_copy(update={"patterns": kept, "patterns_exact": False, "sketch_k": k})


def standard_error_bound(m: int, population: int) -> float:
    """The 1/sqrt(m) scale of the estimators' standard error: sqrt((1 - m/N) / m).

    This includes the finite-population correction, so it is 0 when the sample is everything.
    """
    if m <= 0:
        return math.inf
    return math.sqrt(max(0.0, 1.0 - m / max(population, m)) / m)
