"""Liveness, readiness (database and schema revision) and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from monitor.service.auth import Project
from monitor.service.state import Services, services
from monitor.store import SchemaOutOfDate, require_current_schema

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up (no token needed)")
def healthz() -> dict[str, str]:
    """Liveness: answers as long as the worker runs."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database answers and its schema is current (no token needed)",
    responses={503: {"description": "Not ready; 'detail' says why."}},
)
def readyz(svc: Annotated[Services, Depends(services)]) -> JSONResponse:
    """Readiness: 200 only when the database answers and is at this apmon's schema revision."""
    try:
        with svc.engine.connect() as connection:
            connection.execute(text("select 1"))
        require_current_schema(svc.engine)
    except SchemaOutOfDate as error:
        return JSONResponse({"status": "not ready", "detail": str(error)}, status_code=503)
    except SQLAlchemyError as error:
        detail = f"database unreachable: {type(error).__name__}"
        return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics (needs a token like every API route)")
def metrics(svc: Annotated[Services, Depends(services)], _project: Project) -> Response:
    """Prometheus exposition of ingest counts, latency, plugin errors and queue depths."""
    if svc.mlflow is not None:
        svc.metrics.sink_queue.labels("mlflow").set(svc.mlflow.depth)
    svc.metrics.sink_queue.labels("webhooks").set(svc.webhooks.depth)
    body = svc.metrics.render(svc.store.pending_batch_count)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
