"""The self-contained HTML report page: run facts, the PNG figures and the interactive Sankeys.

Everything is inside the one file: PNGs as base64 data URLs and plotly.js inlined once, so the
page opens offline and loads nothing from elsewhere.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from monitor.schema import ActivationDiagram
from monitor.store.entities import MeasurePoint, RunInfo

PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1200px; color: #222; }
table.facts td { padding: 2px 12px 2px 0; vertical-align: top; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
"""


def _facts(run: RunInfo, sites: Sequence[str], points: Sequence[MeasurePoint]) -> list[tuple]:
    steps = [p.step for p in points]
    return [
        ("run", run.id),
        ("name", run.name or "-"),
        ("status", run.status),
        ("project", run.project),
        ("created", run.created_at.isoformat(timespec="seconds")),
        ("finished", run.finished_at.isoformat(timespec="seconds") if run.finished_at else "-"),
        ("MLflow run", run.mlflow_run_id or "-"),
        ("sites", ", ".join(sites)),
        ("steps with measures", f"{min(steps)}..{max(steps)}" if steps else "-"),
    ]


def render_html(
    run: RunInfo,
    sites: Sequence[str],
    points: Sequence[MeasurePoint],
    pngs: Sequence[Path],
    diagrams: Sequence[tuple[int, ActivationDiagram]],
) -> str:
    """The report page as one HTML string."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from monitor.plots_samples import sankey

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>apmon report {html.escape(run.id)}</title>",
        f"<style>{PAGE_STYLE}</style>",
    ]
    if diagrams:
        parts.append(f"<script>{get_plotlyjs()}</script>")
    parts += ["</head><body>", "<h1>apmon report</h1>", '<table class="facts">']
    for key, value in _facts(run, sites, points):
        parts.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    if diagrams:
        parts.append("<h2>Activation pattern diagrams</h2>")
        parts.append(
            "<p>Craighero et al.: one column per site and one for the predicted labels; nodes "
            "are the patterns of a labelled probe subset, edges the flows of samples; edge "
            "colour is the share of misclassified samples (grey: none, red: all). Hover for "
            "counts and purity.</p>"
        )
        for step, diagram in diagrams:
            figure = sankey(diagram, step)
            parts.append(
                pio.to_html(
                    figure,
                    full_html=False,
                    include_plotlyjs=False,
                    include_mathjax=False,
                    config={"displaylogo": False, "responsive": True},
                )
            )
    parts.append("<h2>Figures</h2>")
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
) -> Path:
    """Write the page to ``path``; returns it."""
    path.write_text(render_html(run, sites, points, pngs, diagrams), encoding="utf-8")
    return path
