"""Response and request bodies of the REST API that are not wire records (those are in schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from monitor.schema import AlertValue, NonNegInt, SiteInfo


class ApiModel(BaseModel):
    """Base of API bodies: unknown fields are errors, NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RunOut(ApiModel):
    """A run as the API shows it."""

    id: str
    project: str
    name: str
    status: str
    mlflow_run_id: str | None
    created_at: datetime
    finished_at: datetime | None
    config: dict[str, Any]


class IngestOut(ApiModel):
    """The answer to an ingest: was the batch new, what got processed, which alerts it raised.

    The client hands the alerts to the user's ``on_alert``.
    """

    run_id: str
    stream: str
    seq: int
    duplicate: bool
    processed_batches: int = Field(description="Batches of this run processed by this request.")
    pending_batches: int = Field(description="Batches of this run still waiting for their turn.")
    alerts: list[AlertValue]


class FinishIn(ApiModel):
    """End of a run: the last step trained, and what the client lost on its way."""

    final_step: NonNegInt
    dropped_records: NonNegInt = Field(
        default=0,
        description="Records the client dropped because its spool was full; listed in /errors.",
    )


class FinishOut(ApiModel):
    """What finishing did."""

    run_id: str
    status: str
    alerts: list[AlertValue]


class SitesOut(ApiModel):
    """The run's sites in forward-call order."""

    sites: list[SiteInfo]


class MeasureOut(ApiModel):
    """One stored measure value."""

    step: int
    name: str
    site: str | None
    source: str
    value: float
    plugin: str
    plugin_version: str


class ProbeOut(ApiModel):
    """One stored probe point."""

    step: int
    site: str
    kind: str
    lr: float
    eta: float
    rows: int
    changed: int


class FitOut(ApiModel):
    """One stored transition fit."""

    step: int
    site: str | None
    mu: float | None
    sigma: float | None
    residual: float | None
    points: int
    ok: bool
    reason: str


class AlertOut(ApiModel):
    """One stored alert."""

    id: int
    step: int
    kind: str
    severity: str
    site: str | None
    message: str
    evidence: dict[str, Any]
    plugin: str
    created_at: datetime


class ErrorOut(ApiModel):
    """A recorded processing failure: a plugin that raised, or a batch that could not be stored."""

    source: str
    step: int
    error: str


class PluginOut(ApiModel):
    """A loaded plugin."""

    name: str
    version: str
    requires: list[str]


class Problem(ApiModel):
    """Every 4xx/5xx body: ``detail`` says what is wrong."""

    detail: Any
