"""Report figures: the matrices behind them equal a direct computation, and every figure renders."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from monitor import plots
from monitor import plots_interactive as interactive
from monitor.plots import site_step_matrix
from monitor.report import render_report, site_table
from monitor.schema import (
    AlertValue,
    FitValue,
    MeasureValue,
    ProbeRecord,
    RunStart,
    SiteInfo,
    SiteProbe,
    SiteSummary,
    StepSummary,
)
from monitor.store import PluginOutcome, SqlStore
from monitor.store.entities import MeasurePoint

SITES = ["a#0", "b#0"]


def _point(step: int, site: str | None, name: str, value: float) -> MeasurePoint:
    return MeasurePoint(step, name, site, "train", value, "p", "1")


def test_site_step_matrix_places_every_value() -> None:
    points = [_point(s, site, "m", 10 * s + i) for s in (0, 2, 5) for i, site in enumerate(SITES)]
    points.append(_point(7, "a#0", "m", 99.0))  # b#0 has no value at step 7
    points.append(_point(7, "a#0", "other", -1.0))
    matrix, steps = site_step_matrix(points, "m", SITES)
    assert steps == [0, 2, 5, 7]
    expected = np.array([[0, 20, 50, 99], [1, 21, 51, np.nan]], dtype=float)
    np.testing.assert_array_equal(matrix, expected)


def test_site_table_takes_the_last_step_per_site() -> None:
    points = [_point(1, "a#0", "distinct", 3.0), _point(4, "a#0", "distinct", 5.0)]
    table = site_table(points)
    assert "a#0" in table and "5" in table.splitlines()[2] and "3" not in table.splitlines()[2]


def _fill_run(store: SqlStore) -> str:
    run_id = store.create_run(
        "p", RunStart(sites=[SiteInfo(name=s, kind="dense", units=4) for s in SITES])
    )
    for step in range(6):
        site = SiteSummary(site="a#0", rows=2, distinct=1, spectrum=[(2, 1)], unit_on=[2, 0, 0, 0])
        store.save_summary(run_id, StepSummary(step=step, sites=[site], loss=1.0 / (step + 1)))
        outcome = PluginOutcome("train")
        for site_name in SITES:
            outcome.measures.append(
                ("p", "1", MeasureValue(name="rel_entropy", value=step / 10, site=site_name))
            )
        outcome.measures.append(
            ("p", "1", MeasureValue(name="D", value=0.1, site="a#0", source="apt"))
        )
        outcome.fits.append(("f", "1", FitValue(mu=-1.0 + step, sigma=1.0, points=8, ok=True)))
        if step == 4:
            outcome.alerts.append(("d", AlertValue(kind="divergence", step=4, message="x")))
        store.save_outcome(run_id, step, outcome)
        etas = [10 ** (k / 2 - 3) for k in range(8)]
        changed = [round(10 * (1 + math.erf(math.log(e))) / 2) for e in etas]
        store.save_probe(
            run_id,
            ProbeRecord(
                step=step,
                kind="sweep",
                lr=0.1,
                sites=[SiteProbe(site=s, rows=10, etas=etas, changed=changed) for s in SITES],
            ),
        )
    return run_id


def test_render_report_writes_every_figure(store: SqlStore, tmp_path: Path) -> None:
    run_id = _fill_run(store)
    files = render_report(store, run_id, tmp_path / "out")
    assert files[-1] == tmp_path / "out" / "report.html"  # the page comes last
    assert files[0] == tmp_path / "out" / "alerts.json"  # every alert, first
    files = files[1:-1]
    names = {f.stem for f in files}
    assert names == {
        "heatmap_train_rel_entropy",
        "heatmap_apt_D",
        "phase_diagram",
        "transition_fit",
        "timeline",
    }
    for path in files:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5_000


def test_report_page_holds_facts_alerts_and_every_figure_offline(
    store: SqlStore, tmp_path: Path
) -> None:
    run_id = _fill_run(store)
    extra = PluginOutcome("train")
    extra.alerts = [
        ("d", AlertValue(kind="bad_batch", step=5, message="<batch 7>", site="a#0")),
        ("d", AlertValue(kind="bad_batch", step=5, message="second", severity="critical")),
    ]
    store.save_outcome(run_id, 5, extra)
    files = render_report(store, run_id, tmp_path / "out")
    stored = store.alerts(run_id)
    listed = json.loads((tmp_path / "out" / "alerts.json").read_text())
    assert [(a["step"], a["kind"], a["message"]) for a in listed] == sorted(
        (a.step, a.kind, a.message) for a in stored
    )
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    table = page.split('<table class="alerts">')[1].split("</table>")[0]
    assert table.count("<tr class=") == len(stored) == 3
    assert "&lt;batch 7&gt;" in table and "<batch 7>" not in page  # escaped
    assert "bad_batch 2, divergence 1" in page  # the facts count alerts per kind
    # interactive: the time line, one heat map per (measure, source) with sites, the phase diagram
    assert page.count("Plotly.newPlot") == 1 + 2 + 1
    pngs = [f for f in files if f.suffix == ".png"]
    assert page.count('<img alt="') == len(pngs) == 5
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|<img[^>]+src=\"(?!data:)", page)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", page)


def test_time_line_uses_a_log_axis_for_a_loss_over_decades() -> None:
    steep = [(s, 10.0 ** (-s / 2)) for s in range(6)]  # 2.5 decades
    flat = [(s, 1.0 / (s + 1)) for s in range(6)]  # under one decade
    assert interactive.timeline(steep, [], []).layout.yaxis.type == "log"
    assert interactive.timeline(flat, [], []).layout.yaxis.type != "log"
    assert plots.timeline(steep, [], []).axes[0].get_yscale() == "log"
    assert plots.timeline(flat, [], []).axes[0].get_yscale() == "linear"
