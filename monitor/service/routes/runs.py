"""Run lifecycle: start (server- or client-chosen id), list, read, heartbeat, finish."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Response, status

from monitor.schema import RunStart
from monitor.service.api import FinishIn, FinishOut, RunOut, SitesOut
from monitor.service.auth import Project, project_run
from monitor.service.state import Services, services
from monitor.sinks.tracking import standard_tags
from monitor.store import NotFound, StoreError
from monitor.store.entities import RunInfo

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

RunId = Annotated[
    str,
    Path(
        min_length=1, max_length=36, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run id"
    ),
]
Svc = Annotated[Services, Depends(services)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such run in the token's project."}
}


def run_out(run: RunInfo) -> RunOut:
    """The API view of a stored run."""
    return RunOut(
        id=run.id,
        project=run.project,
        name=run.name,
        status=run.status,
        mlflow_run_id=run.mlflow_run_id,
        created_at=run.created_at,
        finished_at=run.finished_at,
        config=run.config,
    )


def _create(svc: Services, project: str, start: RunStart, run_id: str) -> RunInfo:
    svc.store.create_run(project, start, run_id=run_id)
    run = svc.store.run(run_id)
    if svc.mlflow is not None:
        params: dict[str, object] = {f"apmon.{k}": v for k, v in start.config.items()}
        svc.mlflow.open_run(run_id, start.name, params, standard_tags(start))
    return run


@router.post(
    "", status_code=status.HTTP_201_CREATED, summary="Start a run (the service picks its id)"
)
def start_run(start: RunStart, svc: Svc, project: Project) -> RunOut:
    """Create a run in the token's project.

    Its MLflow run is created in the background, or the client's own MLflow run is used when
    ``mlflow_run_id`` is given.
    """
    return run_out(_create(svc, project, start, str(uuid.uuid4())))


@router.put(
    "/{run_id}",
    summary="Start a run with a client-chosen id (idempotent)",
    responses={201: {"description": "Created."}, **NOT_FOUND},
)
def put_run(
    run_id: RunId, start: RunStart, svc: Svc, project: Project, response: Response
) -> RunOut:
    """Create the run unless it exists; a client that spools its start can retry it safely."""
    try:
        existing = svc.store.run(run_id)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.project != project:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run with id {run_id!r}")
        return run_out(existing)
    try:
        run = _create(svc, project, start, run_id)
    except StoreError:
        # Two retries of the same start raced: the other one created it (201 went to it).
        return run_out(project_run(svc, project, run_id))
    response.status_code = status.HTTP_201_CREATED
    return run_out(run)


@router.get("", summary="The project's runs, newest first")
def list_runs(svc: Svc, project: Project) -> list[RunOut]:
    """Every run of the token's project."""
    return [run_out(r) for r in svc.store.runs(project)]


@router.get("/{run_id}", responses=NOT_FOUND, summary="One run")
def get_run(run_id: RunId, svc: Svc, project: Project) -> RunOut:
    """The run, if it belongs to the token's project."""
    return run_out(project_run(svc, project, run_id))


@router.get("/{run_id}/sites", responses=NOT_FOUND, summary="The run's sites in call order")
def get_sites(run_id: RunId, svc: Svc, project: Project) -> SitesOut:
    """Activation sites the client announced, in forward-call order."""
    project_run(svc, project, run_id)
    return SitesOut(sites=list(svc.store.sites(run_id).values()))


@router.post(
    "/{run_id}/heartbeat",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="The client is alive",
)
def heartbeat(run_id: RunId, svc: Svc, project: Project) -> Response:
    """Record the time of the client's last sign of life."""
    project_run(svc, project, run_id)
    svc.store.heartbeat(run_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{run_id}/finish", responses=NOT_FOUND, summary="End the run")
def finish_run(run_id: RunId, body: FinishIn, svc: Svc, project: Project) -> FinishOut:
    """Process every waiting batch, run end-of-run plugins, close the run. Idempotent.

    End-of-run plugins do e.g. Jaccard against the final measurement; the MLflow run ends once
    its metrics are sent.
    """
    try:
        processed = svc.ingestor.finish(
            project, run_id, body.final_step, dropped_records=body.dropped_records
        )
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run with id {run_id!r}") from None
    run = svc.store.run(run_id)
    return FinishOut(run_id=run_id, status=run.status, alerts=processed.alerts)
