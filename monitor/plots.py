"""The figures of the sources, as pure functions of stored data (entities in, Figure out).

- ``site_step_heatmap``: a measure per site (rows, in forward order) and step (columns), as in
  Hartmann et al. 2021, Figs. 3-6.
- ``phase_diagram``: D(eta) of the sensitivity sweeps over steps (x) and trial learning rates
  (y, log), with the learning rate actually used drawn in (thesis Sec. 3.2, Fig. 3.14).
- ``transition_curves``: mu and sigma of the transition fit of the site mean over steps
  (thesis Fig. 3.19), alerts as vertical lines.
- ``timeline``: loss and run-level measures over steps, alerts on the time line.
- ``actcool_curves``: ActCoolLR's target and measured temperature and its learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from monitor.store.entities import AlertRecord, FitPoint, MeasurePoint, ProbePoint

ALERT_COLORS = {"critical": "tab:red", "warning": "tab:orange", "info": "tab:gray"}


def _mark_alerts(axes: plt.Axes, alerts: Sequence[AlertRecord]) -> None:
    labelled: set[str] = set()
    for alert in alerts:
        label = None if alert.kind in labelled else f"alert: {alert.kind}"
        labelled.add(alert.kind)
        axes.axvline(
            alert.step,
            color=ALERT_COLORS.get(alert.severity, "tab:orange"),
            linestyle="--",
            linewidth=1,
            label=label,
        )


def site_step_matrix(
    points: Sequence[MeasurePoint], measure: str, sites: Sequence[str], source: str = "train"
) -> tuple[np.ndarray, list[int]]:
    """The (site x step) matrix of one measure, NaN where a site has no value at a step."""
    selected = [
        p for p in points if p.name == measure and p.site is not None and p.source == source
    ]
    steps = sorted({p.step for p in selected})
    column = {step: i for i, step in enumerate(steps)}
    row = {site: i for i, site in enumerate(sites)}
    matrix = np.full((len(sites), len(steps)), np.nan)
    for p in selected:
        if p.site in row:
            matrix[row[p.site], column[p.step]] = p.value
    return matrix, steps


def site_step_heatmap(
    points: Sequence[MeasurePoint],
    measure: str,
    sites: Sequence[str],
    source: str = "train",
    alerts: Sequence[AlertRecord] = (),
) -> Figure:
    """Heat map of one measure over sites (rows) and steps (columns)."""
    matrix, steps = site_step_matrix(points, measure, sites, source)
    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.35 * max(len(sites), 1)))
    if steps:
        extent = (steps[0] - 0.5, steps[-1] + 0.5, len(sites) - 0.5, -0.5)
        image = axes.imshow(matrix, aspect="auto", interpolation="nearest", extent=extent)
        figure.colorbar(image, ax=axes, label=measure)
    _mark_alerts(axes, alerts)
    axes.set_yticks(range(len(sites)), labels=list(sites))
    axes.set_xlabel("step")
    axes.set_title(f"{measure} per site ({source})")
    figure.tight_layout()
    return figure


def phase_diagram(probes: Sequence[ProbePoint], alerts: Sequence[AlertRecord] = ()) -> Figure:
    """Mean over sites of D(eta) for every sweep step, with the used learning rate drawn in."""
    sweeps = [p for p in probes if p.kind == "sweep"]
    figure, axes = plt.subplots(figsize=(10, 4.5))
    if sweeps:
        steps = sorted({p.step for p in sweeps})
        etas = sorted({p.eta for p in sweeps})
        total = np.zeros((len(etas), len(steps)))
        count = np.zeros_like(total)
        s_index = {s: i for i, s in enumerate(steps)}
        e_index = {e: i for i, e in enumerate(etas)}
        used: dict[int, float] = {}
        for p in sweeps:
            total[e_index[p.eta], s_index[p.step]] += p.changed / p.rows
            count[e_index[p.eta], s_index[p.step]] += 1
            used[p.step] = p.lr
        mean = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
        image = axes.pcolormesh(
            _edges(np.array(steps, dtype=float)),
            _edges(np.array(etas), log=True),
            mean,
            shading="flat",
            cmap="magma",
            vmin=0.0,
            vmax=1.0,
        )
        figure.colorbar(image, ax=axes, label="D (fraction of rows that change pattern)")
        axes.plot(steps, [used[s] for s in steps], color="cyan", linewidth=2, label="used lr")
        axes.set_yscale("log")
    _mark_alerts(axes, alerts)
    axes.set_xlabel("step")
    axes.set_ylabel("trial learning rate eta")
    axes.set_title("learning-rate phase diagram (mean over sites)")
    if sweeps or alerts:
        axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def _edges(centres: np.ndarray, log: bool = False) -> np.ndarray:
    """Cell edges around sorted cell centres (geometric midpoints on a log axis)."""
    values = np.log(centres) if log else centres
    if values.size == 1:
        edges = np.array([values[0] - 0.5, values[0] + 0.5])
    else:
        middle = (values[1:] + values[:-1]) / 2
        edges = np.concatenate(
            [
                [values[0] - (middle[0] - values[0])],
                middle,
                [values[-1] + (values[-1] - middle[-1])],
            ]
        )
    return np.exp(edges) if log else edges


def transition_curves(fits: Sequence[FitPoint], alerts: Sequence[AlertRecord] = ()) -> Figure:
    """The mu and sigma of the site-mean transition fit over steps (converged fits only)."""
    good = [f for f in fits if f.site is None and f.ok and f.mu is not None and f.sigma is not None]
    figure, (mu_axes, sigma_axes) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    steps = [f.step for f in good]
    mu_axes.plot(steps, [f.mu for f in good], marker=".", color="tab:blue")
    mu_axes.set_ylabel("mu (ln eta at D = 1/2)")
    sigma_axes.plot(steps, [f.sigma for f in good], marker=".", color="tab:purple")
    sigma_axes.set_ylabel("sigma (transition width)")
    sigma_axes.set_xlabel("step")
    for axes in (mu_axes, sigma_axes):
        _mark_alerts(axes, alerts)
    mu_axes.set_title("transition fit of the site mean")
    if alerts:
        sigma_axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    """True when every value is positive and max/min is at least 10**decades (log axis)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10**decades


def timeline(
    losses: Sequence[tuple[int, float]],
    points: Sequence[MeasurePoint],
    measures: Sequence[tuple[str, str]],
    alerts: Sequence[AlertRecord] = (),
) -> Figure:
    """Loss and run-level measures (name, source) over steps, one panel each, alerts marked."""
    panels = [("loss", list(losses))] + [
        (
            f"{name} ({source})",
            [
                (p.step, p.value)
                for p in points
                if p.name == name and p.source == source and p.site is None
            ],
        )
        for name, source in measures
    ]
    panels = [(name, series) for name, series in panels if series]
    figure, axes_list = plt.subplots(
        max(len(panels), 1), 1, figsize=(10, 1.8 + 1.8 * len(panels)), sharex=True, squeeze=False
    )
    for axes, (name, series) in zip(axes_list[:, 0], panels, strict=False):
        axes.plot([s for s, _ in series], [v for _, v in series], linewidth=1)
        if name == "loss" and spans_decades([v for _, v in series]):
            axes.set_yscale("log")
        axes.set_ylabel(name)
        _mark_alerts(axes, alerts)
    axes_list[-1, 0].set_xlabel("step")
    axes_list[0, 0].set_title("time line")
    if alerts:
        axes_list[0, 0].legend(loc="upper right")
    figure.tight_layout()
    return figure


def actcool_curves(points: Sequence[MeasurePoint], alerts: Sequence[AlertRecord] = ()) -> Figure:
    """ActCoolLR's target vs measured temperature (bits) and its learning rate over steps.

    Reads the run-level ``actcool/T_target``, ``actcool/T_measured`` and ``actcool/lr``
    measures that ``monitor.schedulers.ActCoolLR`` records through the monitor.
    """

    def series(name: str) -> tuple[list[int], list[float]]:
        chosen = sorted((p.step, p.value) for p in points if p.name == name and p.site is None)
        return [s for s, _ in chosen], [v for _, v in chosen]

    figure, (t_axes, lr_axes) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    t_axes.plot(*series("actcool/T_target"), color="black", linewidth=1.5, label="target T(t)")
    t_axes.plot(
        *series("actcool/T_measured"), ".", color="tab:red", markersize=4, label="measured T"
    )
    t_axes.set_ylabel("temperature (bits)")
    t_axes.set_title("ActCoolLR: activation-pattern temperature and learning rate")
    lr_steps, lrs = series("actcool/lr")
    lr_axes.plot(lr_steps, lrs, color="tab:blue", linewidth=1)
    if lrs and min(lrs) > 0:
        lr_axes.set_yscale("log")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    for axes in (t_axes, lr_axes):
        _mark_alerts(axes, alerts)
    t_axes.legend(loc="upper right")
    figure.tight_layout()
    return figure
