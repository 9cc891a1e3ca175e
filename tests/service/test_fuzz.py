"""Property-based fuzzing of the whole API from its own OpenAPI schema: no input yields a 5xx.

Schemathesis generates the cases from /openapi.json; Hypothesis drives them. (Schemathesis's
pytest plugin does not run under this pytest, so the operations are driven here directly.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from live_server import model_sites

from monitor.schema import RunStart
from monitor.service.app import create_app
from monitor.settings import Settings
from monitor.store import make_engine, upgrade

EXAMPLES_PER_OPERATION = 30


def test_no_input_makes_the_service_fail(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    upgrade(make_engine(url))
    app = create_app(Settings(database_url=url, mlflow_tracking_uri="", max_body_bytes=256 * 1024))
    store = app.state.services.store
    token = store.create_token("fuzz")
    run_id = store.create_run("fuzz", RunStart(name="target", sites=model_sites(2, 4)))
    finished_id = store.create_run("fuzz", RunStart(name="to finish"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    statuses: dict[str, set[int]] = {}

    def fuzzer(operation: schemathesis.APIOperation) -> Callable[[], None]:
        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            params = case.path_parameters or {}
            if "run_id" in params and len(str(params["run_id"])) % 2:
                # Half the cases aim at a run that exists, so validation and ingest are reached.
                params["run_id"] = finished_id if "finish" in case.path else run_id
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            statuses.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.text[:500])

        return fuzz  # type: ignore[no-any-return]

    for operation in operations:
        fuzzer(operation)()
    assert set(statuses) == {op.label for op in operations}
    # The fuzzer got past auth and validation somewhere, not only into 4xx walls.
    assert any(code < 300 for codes in statuses.values() for code in codes)
