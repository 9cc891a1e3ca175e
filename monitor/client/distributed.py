"""Exact merging of per-site statistics across data-parallel ranks (``torch.distributed``).

Each rank holds ``SiteStats`` of its own rows; ``all_gather_stats`` gathers every rank's full
histograms, on-counts and class counts and merges them with ``SiteStats.merge``, which only adds
counts, so the result equals the statistics of all ranks' rows counted in one process (the same
pattern has the same fingerprint on every rank). Works with any backend; the statistics travel
as CPU tensors via ``all_gather_object`` (a few bytes per distinct pattern).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from monitor.client.summary import SiteStats


def _portable(stats: dict[str, SiteStats]) -> dict[str, SiteStats]:
    return {name: s.to("cpu") for name, s in stats.items()}


def merge_all(parts: list[dict[str, SiteStats]]) -> dict[str, SiteStats]:
    """Merge several ranks' statistics site by site.

    Sites seen by only some ranks are included; sites keep their first appearance order.
    """
    merged: dict[str, SiteStats] = {}
    for part in parts:
        for name, stats in part.items():
            previous = merged.get(name)
            merged[name] = stats if previous is None else previous.merge(stats)
    return merged


def all_gather_stats(
    stats: dict[str, SiteStats],
    group: Any = None,
    device: torch.device | str | None = None,
) -> dict[str, SiteStats]:
    """Every rank's statistics merged exactly, returned on every rank of ``group``.

    A collective: all ranks must call it at the same step. The result is on ``device`` (default:
    CPU).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, _portable(stats), group=group)
    merged = merge_all(gathered)
    if device is not None:
        merged = {name: s.to(device) for name, s in merged.items()}
    return merged


def is_leader(group: Any = None) -> bool:
    """True on the rank that ships merged summaries.

    That is rank 0 of the group, and every process that runs without ``torch.distributed``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank(group) == 0


class SilentTransport:
    """The transport of a non-leader rank under ``merge_ranks``.

    Its statistics reach the leader through ``all_gather_stats``, so it ships nothing and opens
    no run of its own.
    """

    run_id = ""

    def start_run(self, start: Any) -> str:
        """Open nothing."""
        return ""

    def add_sites(self, sites: Any) -> None:
        """Drop."""

    def send_summary(self, summary: Any) -> None:
        """Drop."""

    def send_probe(self, probe: Any) -> None:
        """Drop."""

    def poll_alerts(self) -> list[Any]:
        """No alerts on a non-leader rank."""
        return []

    def finish(self, final_step: int) -> None:
        """Nothing to finish."""
