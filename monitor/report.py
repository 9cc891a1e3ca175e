"""Reports of stored runs: the closing table of the demo and the rendered figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.sinks.alerts import AlertTally, alerts_json
from monitor.store.entities import AlertRecord, MeasurePoint
from monitor.store.store import Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TABLE_MEASURES = ("distinct", "max_freq", "entropy", "rel_entropy")
# (measure, source) of the layer x step heat maps and of the run-level time line panels.
HEATMAPS = (
    ("rel_entropy", "train"),
    ("dead", "train"),
    ("jaccard_init", "probe_set"),
    ("jaccard_prev", "probe_set"),
    ("jaccard_final", "probe_set"),
    ("signed", "probe_set"),
    ("D", "apt"),
    # sample-set averages of seed 002 (plugins/sample_sets.py), on a labelled probe set
    ("activation_fraction", "probe_set"),
    ("predictability", "probe_set"),
    ("informativeness", "probe_set"),
)
TIMELINE = (
    ("T_mean", "apt"),
    ("sigma_mean", "sweep"),
    ("rel_entropy_mean", "train"),
    ("jaccard_init_mean", "probe_set"),
)


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


def render_report(store: Store, run_id: str, out_dir: Path) -> list[Path]:
    """Render every figure of a stored run into ``out_dir``; returns the files written.

    ``alerts.json`` (every alert), the PNG figures, then ``report.html``: the page with the
    run's facts, its alerts as a table, interactive time line, heat maps and phase diagram
    (``monitor.plots_interactive``), the PNGs and a Sankey per stored activation pattern
    diagram (``monitor.report_html``).
    """
    import matplotlib.pyplot as plt

    from monitor import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    sites = list(store.sites(run_id))
    measures = store.measures(run_id)
    alerts = store.alerts(run_id)
    alerts_file = out_dir / "alerts.json"
    alerts_file.write_text(alerts_json(alerts), encoding="utf-8")
    probes = store.probes(run_id)
    fits = store.fits(run_id)
    present = {(p.name, p.source) for p in measures}
    figures: dict[str, Figure] = {}
    for measure, source in HEATMAPS:
        if (measure, source) in present:
            figures[f"heatmap_{source}_{measure}"] = plots.site_step_heatmap(
                measures, measure, sites, source=source, alerts=alerts
            )
    if any(p.kind == "sweep" for p in probes):
        figures["phase_diagram"] = plots.phase_diagram(probes, alerts)
    if any(f.site is None and f.ok for f in fits):
        figures["transition_fit"] = plots.transition_curves(fits, alerts)
    if any(p.name == "actcool/T_target" for p in measures):
        figures["actcool"] = plots.actcool_curves(measures, alerts)
    losses = [
        (summary.step, summary.loss)
        for summary in store.step_summaries(run_id, "train")
        if summary.loss is not None
    ]
    panels = [panel for panel in TIMELINE if panel in present]
    figures["timeline"] = plots.timeline(losses, measures, panels, alerts)
    diagrams = store.diagrams(run_id)
    if diagrams:
        from monitor.plots_samples import flow_clusters

        figures["flow_clusters"] = flow_clusters(diagrams)
    written = []
    for name, figure in figures.items():
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    from monitor.report_html import write_html_report

    page = write_html_report(
        store.run(run_id),
        sites,
        measures,
        written,
        diagrams,
        out_dir / "report.html",
        alerts=alerts,
        figures=interactive_figures(store, run_id, losses, panels),
    )
    return [alerts_file, *written, page]


def interactive_figures(
    store: Store,
    run_id: str,
    losses: Sequence[tuple[int, float]],
    panels: Sequence[tuple[str, str]],
) -> list[tuple[str, Any]]:
    """The page's plotly figures as (section, figure): time line, heat maps, phase diagram."""
    from monitor import plots_interactive as interactive

    sites = list(store.sites(run_id))
    measures = store.measures(run_id)
    alerts = store.alerts(run_id)
    present = {(p.name, p.source) for p in measures if p.site is not None}
    figures: list[tuple[str, Any]] = [
        ("Time line", interactive.timeline(losses, measures, panels, alerts))
    ]
    for measure, source in HEATMAPS:
        if (measure, source) in present:
            figure = interactive.site_step_heatmap(measures, measure, sites, source)
            figures.append(("Heat maps (site x step)", figure))
    probes = store.probes(run_id)
    if any(p.kind == "sweep" for p in probes):
        figures.append(("Phase diagram", interactive.phase_diagram(probes)))
    return figures


def log_report_to_mlflow(
    tracking_uri: str,
    mlflow_run_id: str,
    files: Sequence[Path],
    alerts: Sequence[AlertRecord] | None = None,
) -> None:
    """Attach rendered figures to the run's MLflow run under ``apmon-report/``.

    With ``alerts`` (all the run's stored alerts), the ``apmon.alert.<kind>`` tags are set from
    them: the service's workers each count only the alerts they saw while the run went on.
    """
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in files:
        client.log_artifact(mlflow_run_id, str(path), artifact_path="apmon-report")
    if alerts:
        tally = AlertTally()
        tally.add(alerts)
        client.log_batch(mlflow_run_id, tags=[RunTag(k, v) for k, v in tally.tags().items()])
