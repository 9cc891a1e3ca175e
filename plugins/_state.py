"""Compact, bounded copies of site summaries kept in plugin state between events."""

from __future__ import annotations

from typing import Any

from monitor.schema import SiteSummary
from monitor.sketch import truncate

# Most patterns a plugin keeps per site and summary: a bottom-k sample of this size bounds the
# state whatever sketch size the client chose (a bottom-k sample of a bottom-k sample is one).
MAX_KEPT_PATTERNS = 1024


def pack(summary: SiteSummary, k: int = MAX_KEPT_PATTERNS) -> dict[str, Any]:
    """JSON form of the parts of a summary that Jaccard and changes need, at most k patterns."""
    kept = truncate(summary, k)
    return {
        "site": kept.site,
        "rows": kept.rows,
        "distinct": kept.distinct,
        "patterns": [[fp, c] for fp, c in kept.patterns],
        "exact": kept.patterns_exact,
    }


def unpack(data: dict[str, Any]) -> SiteSummary:
    """The summary ``pack`` stored (without spectrum and unit counts)."""
    return SiteSummary(
        site=data["site"],
        rows=data["rows"],
        distinct=data["distinct"],
        patterns=[(int(fp), int(c)) for fp, c in data["patterns"]],
        patterns_exact=data["exact"],
    )
