"""Text views of stored results (pure functions of stored data, as the plots are)."""

from __future__ import annotations

from collections.abc import Sequence

from monitor.settings import Settings
from monitor.store.entities import MeasurePoint

TABLE_MEASURES = ("distinct", "max_freq", "entropy", "rel_entropy")


def site_table(points: Sequence[MeasurePoint], measures: Sequence[str] = TABLE_MEASURES) -> str:
    """Per-site values at the last step that has them, one row per site in first-seen order."""
    latest: dict[str, dict[str, MeasurePoint]] = {}
    for point in points:
        if point.site is None or point.name not in measures or point.source != "train":
            continue
        row = latest.setdefault(point.site, {})
        if point.name not in row or point.step >= row[point.name].step:
            row[point.name] = point
    if not latest:
        return "no per-site measures stored for this run"
    width = max(len("site"), *(len(site) for site in latest))
    header = f"{'site':<{width}}  {'step':>6}  " + "  ".join(f"{m:>11}" for m in measures)
    lines = [header, "-" * len(header)]
    for site, row in latest.items():
        step = max(p.step for p in row.values())
        cells = [f"{row[m].value:>11.4g}" if m in row else f"{'-':>11}" for m in measures]
        lines.append(f"{site:<{width}}  {step:>6}  " + "  ".join(cells))
    return "\n".join(lines)


def latest_site_table(settings: Settings, run_id: str) -> str:
    """The site table of a stored run."""
    from monitor.store import open_store

    store = open_store(settings.database_url)
    return site_table(store.measures(run_id))
