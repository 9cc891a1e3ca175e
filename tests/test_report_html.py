"""The HTML report page and the Sankey and Fig. 3 figures of stored diagrams."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from monitor.client.diagram import build_diagram
from monitor.plots_samples import cluster_grid, error_colour, flow_clusters, sankey
from monitor.report import render_report
from monitor.schema import MeasureValue, RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.store import PluginOutcome, SqlStore

SITE_A = np.array([0, 0, 0, 1, 1, 2, 3, 3])
SITE_B = np.array([5, 5, 6, 6, 6, 6, 7, 7])
PREDICTED = np.array([1, 1, 1, 0, 0, 0, 2, 2])
TRUTH = np.array([1, 1, 0, 0, 0, 1, 2, 0])


def _diagram(max_nodes: int = 20, max_edges: int = 40):
    return build_diagram([("a#0", SITE_A), ("b#0", SITE_B)], PREDICTED, TRUTH, max_nodes, max_edges)


def test_sankey_carries_every_sample_and_colours_edges_by_error_share() -> None:
    for nodes, edges in ((20, 40), (2, 2)):  # all kept; "other" nodes and remainder edges
        diagram = _diagram(nodes, edges)
        trace = sankey(diagram, step=3).data[0]
        sources, targets = list(trace.link.source), list(trace.link.target)
        values = list(trace.link.value)
        columns = {}
        for i, x in enumerate(trace.node.x):
            columns.setdefault(round(x, 3), []).append(i)
        assert len(columns) == 3  # a, b, predicted label
        assert set(sources) | set(targets) == set(range(len(trace.node.x)))  # no lone nodes
        ordered = [columns[x] for x in sorted(columns)]
        for level in range(2):  # every sample flows from each level to the next
            flowing = sum(v for s, v in zip(sources, values, strict=True) if s in ordered[level])
            assert flowing == diagram.samples
            assert all(
                t in ordered[level + 1]
                for s, t in zip(sources, targets, strict=True)
                if s in ordered[level]
            )
    diagram = _diagram()
    trace = sankey(diagram, step=3).data[0]
    # edge (a: pattern 3) -> (b: pattern 7): samples 6, 7, one wrong: error share 1/2
    expected = {(s, t, n): error_colour(e / n) for s, t, n, e, _ in diagram.flows[0].edges}
    a_nodes = len(diagram.levels[0].counts)
    got = {
        (s, t - a_nodes, n): c
        for s, t, n, c in zip(
            trace.link.source, trace.link.target, trace.link.value, trace.link.color, strict=False
        )
        if s < a_nodes
    }
    assert got == expected
    assert error_colour(0.5) in got.values() and error_colour(0.0) in got.values()


def test_fig3_grid_counts_each_sample_once() -> None:
    diagram = _diagram()
    samples, wrong = cluster_grid(diagram.flows[0], 4)
    assert samples.sum() == 8 and wrong.sum() == 3
    # clusters a->b: {0,1} size 2 pure; {2} 1 wrong; {3,4} 2; {5} 1 wrong; {6,7} 2, one wrong
    assert samples[9, 1] == 6 and samples[9, 0] == 2
    assert wrong[9, 1] == 1 and wrong[9, 0] == 2
    figure = flow_clusters([(0, diagram), (5, diagram)])
    assert len(figure.axes) == 8  # 2 rows x 2 steps, each with its colour bar


def test_report_page_is_self_contained(store: SqlStore, tmp_path: Path) -> None:
    sites = [SiteInfo(name=s, kind="dense", units=2) for s in ("a#0", "b#0")]
    run_id = store.create_run("p", RunStart(name="html", sites=sites))
    for step in (0, 4):
        summaries = [
            SiteSummary(site=s.name, rows=8, distinct=1, spectrum=[(8, 1)], unit_on=[8, 0])
            for s in sites
        ]
        store.save_summary(
            run_id, StepSummary(step=step, source="probe_set", sites=summaries, diagram=_diagram())
        )
        outcome = PluginOutcome("probe_set")
        for s in sites:
            outcome.measures.append(
                (
                    "p",
                    "1",
                    MeasureValue(
                        name="predictability", value=0.1 * step, site=s.name, source="probe_set"
                    ),
                )
            )
        store.save_outcome(run_id, step, outcome)
    files = render_report(store, run_id, tmp_path / "out")
    names = {f.name for f in files}
    assert {"heatmap_probe_set_predictability.png", "flow_clusters.png", "report.html"} <= names
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert page.count('"type":"sankey"') == 2  # one Sankey per stored diagram
    assert page.count('<img alt="') == sum(f.suffix == ".png" for f in files)  # embedded
    assert run_id in page and "html" in page
    # offline: no script, style sheet or image is loaded from anywhere
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    assert not re.search(r'<img[^>]+src="(?!data:)', page)
    assert "Plotly.newPlot" in page
