"""Queries of a run's results: measures (by name, site, steps), probes, fits, alerts, errors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from monitor.schema import StoredText
from monitor.service.api import AlertOut, ErrorOut, FitOut, MeasureOut, ProbeOut
from monitor.service.auth import Project, project_run
from monitor.service.routes.runs import NOT_FOUND, RunId, Svc

router = APIRouter(prefix="/api/v1/runs", tags=["results"])

Step = Annotated[int | None, Query(ge=0, le=2**62)]


@router.get("/{run_id}/measures", responses=NOT_FOUND, summary="Stored measures, by step")
def measures(
    run_id: RunId,
    svc: Svc,
    project: Project,
    name: Annotated[StoredText | None, Query(max_length=128)] = None,
    site: Annotated[StoredText | None, Query(max_length=512)] = None,
    step_min: Step = None,
    step_max: Step = None,
) -> list[MeasureOut]:
    """Measures of the run, filtered by measure name, site and an inclusive step range."""
    project_run(svc, project, run_id)
    points = svc.store.measures(run_id, name, site, step_min, step_max)
    return [MeasureOut(**vars(p)) for p in points]


@router.get("/{run_id}/probes", responses=NOT_FOUND, summary="Stored APT probe and sweep points")
def probes(run_id: RunId, svc: Svc, project: Project) -> list[ProbeOut]:
    """One point per (step, site, eta)."""
    project_run(svc, project, run_id)
    return [ProbeOut(**vars(p)) for p in svc.store.probes(run_id)]


@router.get("/{run_id}/fits", responses=NOT_FOUND, summary="Stored transition fits")
def fits(run_id: RunId, svc: Svc, project: Project) -> list[FitOut]:
    """Transition-model fits of the sweeps, by step."""
    project_run(svc, project, run_id)
    return [FitOut(**vars(f)) for f in svc.store.fits(run_id)]


@router.get("/{run_id}/alerts", responses=NOT_FOUND, summary="Stored alerts")
def alerts(
    run_id: RunId,
    svc: Svc,
    project: Project,
    after_id: Annotated[int | None, Query(ge=0, le=2**62)] = None,
) -> list[AlertOut]:
    """Alerts of the run by step; ``after_id`` returns only newer ones (for polling)."""
    project_run(svc, project, run_id)
    stored = svc.store.alerts(run_id)
    return [AlertOut(**vars(a)) for a in stored if after_id is None or a.id > after_id]


@router.get("/{run_id}/errors", responses=NOT_FOUND, summary="Recorded processing failures")
def errors(run_id: RunId, svc: Svc, project: Project) -> list[ErrorOut]:
    """Plugins that raised and batches that could not be stored, oldest first."""
    project_run(svc, project, run_id)
    return [ErrorOut(source=s, step=st, error=e) for s, st, e in svc.store.errors(run_id)]
