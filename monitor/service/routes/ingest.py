"""Ingest of batched summaries and probe results."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, status

from monitor.schema import IngestBatch
from monitor.service.api import IngestOut
from monitor.service.auth import Project
from monitor.service.ingest import BadBatch, Conflict, RunClosed
from monitor.service.routes.runs import NOT_FOUND, RunId, Svc
from monitor.store import NotFound

router = APIRouter(prefix="/api/v1/runs", tags=["ingest"])


@router.post(
    "/{run_id}/batches",
    responses={
        **NOT_FOUND,
        409: {"description": "The run is finished, or this seq was received with other content."},
        413: {"description": "The body is larger than the service accepts."},
        422: {"description": "The batch is invalid; 'detail' says where. Nothing was stored."},
    },
    summary="Ingest one batch of summaries and probes (idempotent per run, stream, seq)",
)
def ingest(run_id: RunId, batch: IngestBatch, svc: Svc, project: Project) -> IngestOut:
    """Store the batch once and run the plugins over every batch whose turn has come.

    A retried or duplicated batch answers ``duplicate: true`` and is not stored again; a batch
    under a received seq with other content answers 409. A batch that arrives before a lower
    ``seq`` of its stream waits (even when those announce its sites); plugins always see a
    stream's steps in order. A waiting batch that cannot be processed when its turn comes is
    quarantined and listed in ``/errors``; the batches after it go on. ``alerts`` are those
    raised while this request processed batches.
    """
    started = time.perf_counter()
    try:
        result = svc.ingestor.ingest(project, run_id, batch)
    except NotFound:
        svc.metrics.batches.labels("rejected").inc()
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run with id {run_id!r}") from None
    except (RunClosed, Conflict) as error:
        svc.metrics.batches.labels("rejected").inc()
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except BadBatch as error:
        svc.metrics.batches.labels("rejected").inc()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None
    svc.metrics.batches.labels("duplicate" if result.duplicate else "stored").inc()
    svc.metrics.latency.observe(time.perf_counter() - started)
    return IngestOut(
        run_id=run_id,
        stream=batch.stream,
        seq=batch.seq,
        duplicate=result.duplicate,
        processed_batches=len(result.processed.batches),
        pending_batches=result.pending,
        alerts=result.processed.alerts,
    )
