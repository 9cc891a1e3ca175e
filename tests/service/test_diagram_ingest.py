"""A probe-set summary with a diagram, posted to the REST API, is stored and measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from test_api import SITES, Service, make_service

from monitor.client.diagram import build_diagram
from monitor.schema import IngestBatch, SiteSummary, StepSummary


def test_a_diagram_travels_through_the_service(tmp_path: Path) -> None:
    app, tokens = make_service(tmp_path)
    names = [site.name for site in SITES]
    rng = np.random.default_rng(0)
    diagram = build_diagram(
        [(name, rng.integers(0, 4, 50)) for name in names],
        rng.integers(0, 3, 50),
        rng.integers(0, 3, 50),
    )
    summary = StepSummary(
        step=0,
        source="probe_set",
        sites=[
            SiteSummary(
                site=name,
                rows=50,
                distinct=1,
                spectrum=[(50, 1)],
                unit_on=[50] * site.units,
                class_rows={"0": 20, "1": 30},
                class_unit_on={"0": [20] * site.units, "1": [30] * site.units},
            )
            for name, site in zip(names, SITES, strict=True)
        ],
        diagram=diagram,
    )
    with TestClient(app) as client:
        service = Service(client, tokens)
        run_id = service.start()
        response = service.ingest(run_id, IngestBatch(seq=0, summaries=[summary]))
        assert response.status_code == 200, response.text
        measured = {(m["name"], m["site"]) for m in service.measures(run_id)}
    stored = app.state.services.store.diagrams(run_id)
    assert stored == [(0, diagram)]
    assert ("flow_purity", names[0]) in measured and ("apd_accuracy", None) in measured
    assert ("activation_fraction", names[0]) in measured  # always-on units: f only
    assert ("predictability", names[0]) not in measured
