"""Interactive (plotly) figures of the HTML report: time line, heat maps, phase diagram.

Pure functions of stored data, like ``monitor.plots``; the page inlines plotly.js once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from monitor.plots import site_step_matrix, spans_decades
from monitor.store.entities import AlertRecord, MeasurePoint, ProbePoint

if TYPE_CHECKING:
    import plotly.graph_objects as go


def _cells(matrix: np.ndarray) -> list[list[float | None]]:
    """Rows of a matrix for plotly, NaN (no value) as None: an empty cell."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def _alert_lines(
    figure: go.Figure, alerts: Sequence[AlertRecord], rows: int, top: float | None
) -> None:
    """A dotted line per alert step in every panel, and a marker at height ``top``.

    The markers sit over the first panel; hovering one names the alerts of its step.
    """
    by_step: dict[int, list[str]] = {}
    for alert in alerts:
        by_step.setdefault(alert.step, []).append(f"{alert.kind}: {alert.message[:120]}")
    for step in sorted(by_step):
        for row in range(1, rows + 1):
            figure.add_vline(
                x=step, line_dash="dot", line_color="crimson", opacity=0.6, row=row, col=1
            )
    if by_step and top is not None:
        figure.add_scatter(
            x=list(by_step),
            y=[top] * len(by_step),
            mode="markers",
            name="alerts",
            marker={"color": "crimson", "symbol": "triangle-down", "size": 10},
            hovertext=["<br>".join(texts) for texts in by_step.values()],
            hoverinfo="x+text",
            row=1,
            col=1,
        )


def timeline(
    losses: Sequence[tuple[int, float]],
    points: Sequence[MeasurePoint],
    measures: Sequence[tuple[str, str]],
    alerts: Sequence[AlertRecord] = (),
) -> go.Figure:
    """Loss and run-level measures over steps, one panel each, sharing the step axis."""
    from plotly.subplots import make_subplots

    panels = [("loss", list(losses))] + [
        (
            f"{name} ({source})",
            [
                (p.step, p.value)
                for p in points
                if (p.name, p.source, p.site) == (name, source, None)
            ],
        )
        for name, source in measures
    ]
    panels = [(name, series) for name, series in panels if series] or [("loss", [])]
    figure = make_subplots(
        rows=len(panels),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[name for name, _ in panels],
    )
    for row, (name, series) in enumerate(panels, start=1):
        figure.add_scatter(
            x=[s for s, _ in series],
            y=[v for _, v in series],
            mode="lines",
            name=name,
            row=row,
            col=1,
        )
        if name == "loss" and spans_decades([v for _, v in series]):
            figure.update_yaxes(type="log", row=row, col=1)
    first = [v for _, v in panels[0][1]]
    _alert_lines(figure, alerts, len(panels), max(first) if first else None)
    figure.update_xaxes(title_text="step", row=len(panels), col=1)
    figure.update_layout(height=220 * len(panels) + 80, title="time line", showlegend=False)
    return figure


def site_step_heatmap(
    points: Sequence[MeasurePoint], measure: str, sites: Sequence[str], source: str
) -> go.Figure:
    """One measure over sites (rows) and steps (columns); hover shows site, step and value."""
    import plotly.graph_objects as go

    matrix, steps = site_step_matrix(points, measure, sites, source)
    figure = go.Figure(
        go.Heatmap(
            z=_cells(matrix),
            x=steps,
            y=list(sites),
            colorscale="Viridis",
            colorbar={"title": {"text": measure}},
            hovertemplate="site %{y}<br>step %{x}<br>" + measure + " %{z:.4g}<extra></extra>",
        )
    )
    figure.update_yaxes(autorange="reversed")
    # Steps as categories: one equal cell per measured step, however far apart they are.
    figure.update_xaxes(type="category", title_text="step")
    figure.update_layout(
        title=f"{measure} per site ({source})", height=max(280, 140 + 22 * len(sites))
    )
    return figure


def phase_diagram(probes: Sequence[ProbePoint]) -> go.Figure:
    """Mean over sites of D(eta) per sweep step, with the learning rate in use drawn over it."""
    import plotly.graph_objects as go

    sweeps = [p for p in probes if p.kind == "sweep"]
    steps = sorted({p.step for p in sweeps})
    etas = sorted({p.eta for p in sweeps})
    total = np.zeros((len(etas), len(steps)))
    count = np.zeros_like(total)
    used: dict[int, float] = {}
    s_index = {s: i for i, s in enumerate(steps)}
    e_index = {e: i for i, e in enumerate(etas)}
    for p in sweeps:
        total[e_index[p.eta], s_index[p.step]] += p.changed / p.rows
        count[e_index[p.eta], s_index[p.step]] += 1
        used[p.step] = p.lr
    mean = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
    figure = go.Figure(
        go.Heatmap(
            z=_cells(mean),
            x=steps,
            y=etas,
            zmin=0,
            zmax=1,
            colorscale="Magma",
            colorbar={"title": {"text": "D"}},
            hovertemplate="step %{x}<br>eta %{y:.3g}<br>D %{z:.3f}<extra></extra>",
        )
    )
    figure.add_scatter(
        x=steps,
        y=[used[s] for s in steps],
        mode="lines",
        name="used lr",
        line={"color": "cyan", "width": 2},
    )
    figure.update_yaxes(type="log", title_text="trial learning rate eta")
    figure.update_xaxes(type="category", title_text="step (sweeps)")
    figure.update_layout(title="learning-rate phase diagram (mean over sites)", height=450)
    return figure
