"""Helpers for plugin tests: wire summaries and probes built by hand from explicit rows."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from monitor.measures import RunContext
from monitor.schema import SiteInfo, SiteSummary


def summary_of(
    site: str, patterns: Sequence[int], k: int | None = None, units: int = 4
) -> SiteSummary:
    """The wire summary of rows whose patterns' fingerprints are ``patterns``: every pattern when
    ``k`` is None or there are at most k distinct, else the bottom-k sample."""
    counts = Counter(patterns)
    spectrum = sorted(Counter(counts.values()).items())
    ordered = sorted(counts.items())
    exact = k is None or len(ordered) <= k
    return SiteSummary(
        site=site,
        rows=len(patterns),
        distinct=len(counts),
        spectrum=spectrum,
        patterns=ordered if exact else ordered[:k],
        patterns_exact=exact,
        sketch_k=None if exact else k,
        unit_on=[0] * units,
    )


def random_fingerprints(rng: random.Random, n: int) -> list[int]:
    """n distinct uniform 64-bit fingerprints (what the client's hash gives distinct patterns)."""
    seen: set[int] = set()
    while len(seen) < n:
        seen.add(rng.getrandbits(64))
    return list(seen)


def context(sites: dict[str, int]) -> RunContext:
    """A run context with dense sites of the given unit counts."""
    return RunContext(
        run_id="run",
        sites={name: SiteInfo(name=name, kind="dense", units=u) for name, u in sites.items()},
    )
