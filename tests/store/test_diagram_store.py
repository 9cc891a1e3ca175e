"""Diagrams ride on probe-set summaries into the store (SQLite and PostgreSQL), and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from monitor.client.diagram import build_diagram
from monitor.client.handle import watch
from monitor.schema import RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.settings import Settings
from monitor.store import SqlStore, open_store

SITES = [SiteInfo(name="a#0", kind="dense", units=2), SiteInfo(name="b#0", kind="dense", units=2)]


def _diagram_summary(step: int, with_diagram: bool) -> StepSummary:
    diagram = build_diagram(
        [("a#0", np.array([0, 0, 1, 2])), ("b#0", np.array([0, 1, 1, 1]))],
        np.array([1, 1, 0, 0]),
        np.array([1, 0, 0, 0]),
    )
    sites = [
        SiteSummary(site=s.name, rows=4, distinct=1, spectrum=[(4, 1)], unit_on=[4, 0])
        for s in SITES
    ]
    return StepSummary(
        step=step, source="probe_set", sites=sites, diagram=diagram if with_diagram else None
    )


def test_diagrams_round_trip_in_step_order(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(sites=SITES))
    for step, with_diagram in ((5, True), (0, True), (3, False)):
        store.save_summary(run_id, _diagram_summary(step, with_diagram))
    stored = store.diagrams(run_id)
    assert [step for step, _ in stored] == [0, 5]
    assert stored[0][1] == _diagram_summary(0, True).diagram
    assert [s.step for s in store.step_summaries(run_id, "probe_set")] == [0, 3, 5]


def test_an_embedded_run_stores_diagrams_and_sample_set_measures(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'apmon.db'}", mlflow_tracking_uri="")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    with watch(model, opt, settings=settings, probe_set=(x, y), probe_every=3) as monitor:
        for _ in range(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    store = open_store(settings.database_url)
    # evaluations at 0, 3, 6 (diagrams at indices 0, 1, 2) and the final parameters at step 7
    assert [step for step, _ in store.diagrams(monitor.run_id)] == [0, 3, 6, 7]
    names = {(m.name, m.site) for m in store.measures(monitor.run_id) if m.source == "probe_set"}
    for site in ("1#0", "3#0"):
        assert ("activation_fraction", site) in names
        assert ("predictability", site) in names
    assert ("informativeness_mean", None) in names
    assert ("flow_purity", "1#0") in names and ("flow_strength", "3#0") in names
