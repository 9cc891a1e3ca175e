"""monitor.sketch against brute-force weighted Jaccard and pattern changes on explicit counts."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest
from plugin_fixtures import random_fingerprints, summary_of

from monitor.sketch import pattern_changes, standard_error_bound, truncate, weighted_jaccard


def brute_jaccard(a: list[int], b: list[int]) -> float:
    keys = set(a) | set(b)
    ca, cb = Counter(a), Counter(b)  # explicit count vectors over the union
    return sum(min(ca[k], cb[k]) for k in keys) / sum(max(ca[k], cb[k]) for k in keys)


def brute_changes(a: list[int], b: list[int]) -> dict[str, float]:
    appeared = len(set(b) - set(a)) / len(set(a))
    disappeared = len(set(a) - set(b)) / len(set(a))
    return {"appeared": appeared, "disappeared": disappeared, "signed": appeared - disappeared}


def test_worked_example() -> None:
    a = summary_of("s", [1, 1, 1, 2, 3])  # c = (3, 1, 1, 0)
    b = summary_of("s", [1, 2, 2, 4])  # c' = (1, 2, 0, 1)
    # min: 1 + 1 + 0 + 0 = 2; max: 3 + 2 + 1 + 1 = 7
    assert weighted_jaccard(a, b) == pytest.approx(2 / 7)
    assert pattern_changes(a, b) == pytest.approx(
        {"appeared": 1 / 3, "disappeared": 1 / 3, "signed": 0.0}
    )


@pytest.mark.parametrize("seed", range(20))
def test_exact_summaries_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    pool = random_fingerprints(rng, 12)
    a = [rng.choice(pool[:8]) for _ in range(rng.randint(1, 40))]
    b = [rng.choice(pool[4:]) for _ in range(rng.randint(1, 40))]
    sa, sb = summary_of("s", a), summary_of("s", b)
    assert weighted_jaccard(sa, sb) == pytest.approx(brute_jaccard(a, b))
    assert weighted_jaccard(sb, sa) == pytest.approx(brute_jaccard(a, b))
    changes = pattern_changes(sa, sb)
    assert changes == pytest.approx(brute_changes(a, b))
    # exact: signed change is the change of distinct counts
    assert changes["signed"] == pytest.approx((len(set(b)) - len(set(a))) / len(set(a)))


def test_identical_and_disjoint() -> None:
    a = summary_of("s", [5, 5, 6])
    assert weighted_jaccard(a, a) == 1.0
    assert weighted_jaccard(a, summary_of("s", [7, 8])) == 0.0
    assert pattern_changes(a, a) == {"appeared": 0.0, "disappeared": 0.0, "signed": 0.0}


def test_mixed_exact_and_sketch_equals_bruteforce_when_the_sketch_covers_all() -> None:
    a = summary_of("s", [1, 2, 3, 3], k=10)
    assert a.patterns_exact
    assert weighted_jaccard(a, summary_of("s", [3, 3, 4])) == pytest.approx(
        brute_jaccard([1, 2, 3, 3], [3, 3, 4])
    )


def test_missing_patterns_and_empty_earlier_summary_are_errors() -> None:
    with pytest.raises(ValueError, match="no rows"):
        pattern_changes(summary_of("s", []), summary_of("s", [1]))
    bare = summary_of("s", [1, 2]).model_copy(update={"patterns": []})
    with pytest.raises(ValueError, match="carries no patterns"):
        weighted_jaccard(bare, summary_of("s", [1]))


def _pair(rng: random.Random, distinct: int, overlap: float) -> tuple[list[int], list[int]]:
    """Two row lists over ``distinct`` patterns each, sharing about ``overlap`` of them, with
    counts 1..4."""
    pool = random_fingerprints(rng, 2 * distinct)
    shared = int(distinct * overlap)
    pa = pool[:distinct]
    pb = pool[:shared] + pool[distinct : 2 * distinct - shared]
    rows_a = [p for p in pa for _ in range(rng.randint(1, 4))]
    rows_b = [p for p in pb for _ in range(rng.randint(1, 4))]
    return rows_a, rows_b


def test_bottom_k_estimates_are_unbiased_within_the_stated_error() -> None:
    """Over many random pairs (1000 patterns each, k = 100) the estimate's mean error is near 0
    and its spread is within the stated 1/sqrt(m) scale."""
    rng = random.Random(7)
    k = 100
    errors_j: list[float] = []
    errors_a: list[float] = []
    for _ in range(40):
        a, b = _pair(rng, 1000, 0.6)
        sa, sb = summary_of("s", a, k=k), summary_of("s", b, k=k)
        assert not sa.patterns_exact
        errors_j.append(weighted_jaccard(sa, sb) - brute_jaccard(a, b))
        errors_a.append(pattern_changes(sa, sb)["appeared"] - brute_changes(a, b)["appeared"])
    bound = standard_error_bound(k, 1600)
    assert abs(statistics.fmean(errors_j)) < 2 * bound / 40**0.5 + 0.01
    assert statistics.pstdev(errors_j) < bound
    assert abs(statistics.fmean(errors_a)) < 3 * bound / 40**0.5 + 0.01
    assert statistics.pstdev(errors_a) < 1.5 * bound


def test_truncate_keeps_a_valid_bottom_k_sample() -> None:
    rng = random.Random(3)
    rows = random_fingerprints(rng, 50)
    full = summary_of("s", rows)
    small = truncate(full, 10)
    assert not small.patterns_exact and small.sketch_k == 10
    assert small.patterns == sorted(full.patterns)[:10]
    assert weighted_jaccard(small, full) == 1.0
    assert truncate(full, 100) is full
    assert standard_error_bound(10, 10) == 0.0
