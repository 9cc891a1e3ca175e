"""Mergeable per-site pattern statistics, and their compaction into the wire ``SiteSummary``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from monitor.client.patterns import PatternCounts, count_patterns, empty_counts, merge_counts
from monitor.schema import SiteSummary

# Below this many distinct patterns the summary ships the full histogram (exact Jaccard and
# changes); above it, the bottom-k sample of fingerprints.
DEFAULT_SKETCH_K = 256


@dataclass
class SiteStats:
    """Exact statistics of one site over a set of rows: sums and counts only, so merging is exact.

    ``merge(a, b)`` equals the statistics of a's rows and b's rows together, for every field.
    """

    units: int
    counts: PatternCounts
    unit_on: torch.Tensor
    nonfinite_rows: int = 0
    class_rows: dict[int, int] = field(default_factory=dict)
    class_unit_on: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows counted."""
        return self.counts.rows

    def merge(self, other: SiteStats) -> SiteStats:
        """Statistics of both row sets together."""
        if other.units != self.units:
            raise ValueError(f"cannot merge sites of {self.units} and {other.units} units")
        class_rows = dict(self.class_rows)
        class_unit_on = {k: v.clone() for k, v in self.class_unit_on.items()}
        for label, rows in other.class_rows.items():
            class_rows[label] = class_rows.get(label, 0) + rows
            if label in class_unit_on:
                class_unit_on[label] += other.class_unit_on[label]
            else:
                class_unit_on[label] = other.class_unit_on[label].clone()
        return SiteStats(
            units=self.units,
            counts=merge_counts([self.counts, other.counts]),
            unit_on=self.unit_on + other.unit_on,
            nonfinite_rows=self.nonfinite_rows + other.nonfinite_rows,
            class_rows=class_rows,
            class_unit_on=class_unit_on,
        )


def empty_stats(units: int, device: torch.device | str = "cpu") -> SiteStats:
    """Statistics of no rows."""
    return SiteStats(
        units=units,
        counts=empty_counts(device),
        unit_on=torch.zeros(units, dtype=torch.int64, device=device),
    )


def site_stats(
    mask: torch.Tensor,
    nonfinite_rows: int = 0,
    labels: torch.Tensor | None = None,
) -> SiteStats:
    """Statistics of the rows of a boolean (rows, units) mask; ``labels`` (rows,) adds per-class
    on-counts."""
    stats = SiteStats(
        units=mask.shape[1],
        counts=count_patterns(mask),
        unit_on=mask.sum(dim=0, dtype=torch.int64),
        nonfinite_rows=nonfinite_rows,
    )
    if labels is not None:
        for label in torch.unique(labels).tolist():
            selected = mask[labels == label]
            stats.class_rows[int(label)] = int(selected.shape[0])
            stats.class_unit_on[int(label)] = selected.sum(dim=0, dtype=torch.int64)
    return stats


def to_wire(name: str, stats: SiteStats, sketch_k: int = DEFAULT_SKETCH_K) -> SiteSummary:
    """Compact statistics into a wire summary.

    The count-of-counts spectrum is always exact. ``patterns`` lists every (fingerprint, count)
    when there are at most ``sketch_k`` distinct patterns, else the ``sketch_k`` smallest
    fingerprints (unsigned order): a uniform sample of the distinct patterns, identical for
    equal patterns across steps, from which weighted Jaccard is estimated.
    """
    counts = stats.counts.counts.cpu()
    fps = stats.counts.fingerprints.cpu()
    values, multiplicity = torch.unique(counts, return_counts=True)
    spectrum = list(zip(values.tolist(), multiplicity.tolist(), strict=True))
    unsigned = [fp % 2**64 for fp in fps.tolist()]
    order = sorted(range(len(unsigned)), key=unsigned.__getitem__)
    exact = len(order) <= sketch_k
    kept = order if exact else order[:sketch_k]
    count_list = counts.tolist()
    summary = SiteSummary(
        site=name,
        rows=int(counts.sum()),
        distinct=len(unsigned),
        spectrum=spectrum,
        patterns=[(unsigned[i], count_list[i]) for i in kept],
        patterns_exact=exact,
        sketch_k=None if exact else sketch_k,
        unit_on=stats.unit_on.cpu().tolist(),
        nonfinite_rows=stats.nonfinite_rows,
    )
    if stats.class_rows:
        summary.class_rows = {str(k): v for k, v in sorted(stats.class_rows.items())}
        summary.class_unit_on = {
            str(k): v.cpu().tolist() for k, v in sorted(stats.class_unit_on.items())
        }
    return summary
