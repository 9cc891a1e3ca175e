"""The self-contained HTML report page: run facts, alerts, interactive figures, PNGs, Sankeys.

Everything is inside the one file: PNGs as base64 data URLs and plotly.js inlined once, so the
page opens offline and loads nothing from elsewhere.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.schema import ActivationDiagram
from monitor.store.entities import AlertRecord, MeasurePoint, RunInfo

if TYPE_CHECKING:
    import plotly.graph_objects as go

PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1200px; color: #222; }
table.facts td { padding: 2px 12px 2px 0; vertical-align: top; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
table.alerts { border-collapse: collapse; font-size: 0.9em; }
table.alerts th, table.alerts td { border-bottom: 1px solid #ddd; padding: 3px 8px; }
table.alerts th { text-align: left; }
table.alerts tr.critical td { background: #fde8e8; }
details { margin: 0.5em 0; }
"""
MAX_ALERT_ROWS = 500  # the table's rows; alerts.json beside the page has every alert


def _facts(
    run: RunInfo,
    sites: Sequence[str],
    points: Sequence[MeasurePoint],
    alerts: Sequence[AlertRecord] = (),
) -> list[tuple[str, str]]:
    steps = [p.step for p in points]
    counts: dict[str, int] = {}
    for alert in alerts:
        counts[alert.kind] = counts.get(alert.kind, 0) + 1
    return [
        ("run", run.id),
        ("name", run.name or "-"),
        ("status", run.status),
        ("project", run.project),
        ("created", run.created_at.isoformat(timespec="seconds")),
        ("finished", run.finished_at.isoformat(timespec="seconds") if run.finished_at else "-"),
        ("MLflow run", run.mlflow_run_id or "-"),
        ("sites", f"{len(sites)}: " + ", ".join(sites)),
        ("steps with measures", f"{min(steps)}..{max(steps)}" if steps else "-"),
        ("alerts", ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"),
        *((f"config {k}", str(v)) for k, v in sorted(run.config.items())),
    ]


def _alert_table(alerts: Sequence[AlertRecord]) -> list[str]:
    rows = sorted(alerts, key=lambda a: (a.step, a.id))
    if not rows:
        return ["<h2>Alerts</h2>", "<p>No alerts were raised in this run.</p>"]
    parts = [
        f"<h2>Alerts ({len(rows)})</h2>",
        '<table class="alerts"><tr><th>step</th><th>kind</th><th>severity</th><th>site</th>'
        "<th>message</th></tr>",
    ]
    for alert in rows[:MAX_ALERT_ROWS]:
        cells = (alert.step, alert.kind, alert.severity, alert.site or "-", alert.message)
        row = "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells)
        parts.append(f'<tr class="{html.escape(alert.severity)}">{row}</tr>')
    parts.append("</table>")
    if len(rows) > MAX_ALERT_ROWS:
        parts.append(f"<p>First {MAX_ALERT_ROWS} shown; every alert is in alerts.json.</p>")
    return parts


def _plot(figure: Any) -> str:
    import plotly.io as pio

    return str(
        pio.to_html(
            figure,
            full_html=False,
            include_plotlyjs=False,
            include_mathjax=False,
            config={"displaylogo": False, "responsive": True},
        )
    )


def render_html(
    run: RunInfo,
    sites: Sequence[str],
    points: Sequence[MeasurePoint],
    pngs: Sequence[Path],
    diagrams: Sequence[tuple[int, ActivationDiagram]],
    alerts: Sequence[AlertRecord] = (),
    figures: Sequence[tuple[str, go.Figure]] = (),
) -> str:
    """The report page as one HTML string; ``figures`` are (section, plotly figure) pairs."""
    from plotly.offline import get_plotlyjs

    from monitor.plots_samples import sankey

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>apmon report {html.escape(run.id)}</title>",
        f"<style>{PAGE_STYLE}</style>",
    ]
    if diagrams or figures:
        parts.append(f"<script>{get_plotlyjs()}</script>")
    parts += ["</head><body>", "<h1>apmon report</h1>", '<table class="facts">']
    for key, value in _facts(run, sites, points, alerts):
        parts.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    parts += _alert_table(alerts)
    section = None
    for title, figure in figures:
        if title != section:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            section = title
        parts.append(_plot(figure))
    if diagrams:
        parts.append("<h2>Activation pattern diagrams</h2>")
        parts.append(
            "<p>Craighero et al.: one column per site and one for the predicted labels; nodes "
            "are the patterns of a labelled probe subset, edges the flows of samples; edge "
            "colour is the share of misclassified samples (grey: none, red: all). Hover for "
            "counts and purity.</p>"
        )
        for step, diagram in diagrams:
            parts.append(_plot(sankey(diagram, step)))
    parts.append("<h2>Figures (PNG)</h2>")
    for path in pngs:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        name = html.escape(path.stem)
        parts.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(
    run: RunInfo,
    sites: Sequence[str],
    points: Sequence[MeasurePoint],
    pngs: Sequence[Path],
    diagrams: Sequence[tuple[int, ActivationDiagram]],
    path: Path,
    alerts: Sequence[AlertRecord] = (),
    figures: Sequence[tuple[str, go.Figure]] = (),
) -> Path:
    """Write the page to ``path``; returns it."""
    page = render_html(run, sites, points, pngs, diagrams, alerts, figures)
    path.write_text(page, encoding="utf-8")
    return path
