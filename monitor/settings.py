"""All settings in one pydantic-settings class (env prefix ``APMON_``), passed in, never global."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# When a training process loads apmon's compiled CPU kernels (``monitor.client.kernel_loader``)
KernelPolicy = Literal["auto", "always", "never"]


def default_mlflow_uri() -> str:
    """The standard ``MLFLOW_TRACKING_URI`` when set, else a local SQLite store (no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


class Settings(BaseSettings):
    """Where results go and how the service behaves."""

    model_config = SettingsConfigDict(env_prefix="APMON_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///apmon.db",
        description="SQLAlchemy URL of the apmon database "
        "(SQLite file embedded, PostgreSQL in production).",
    )
    mlflow_tracking_uri: str = Field(
        default_factory=default_mlflow_uri,
        description="MLflow tracking URI; empty string disables the MLflow sink.",
    )
    mlflow_experiment: str = Field(
        default="",
        description="MLflow experiment for new runs; empty follows MLflow: "
        "MLFLOW_EXPERIMENT_NAME, else MLFLOW_EXPERIMENT_ID (mlflow.set_experiment), else 'apmon'.",
    )
    mlflow_keys: Literal["summary", "all"] = Field(
        default="summary",
        description="Embedded: 'summary' logs the run-level measures (site means, fits of the "
        "mean, loss, step scalars) to MLflow; 'all' also every site's.",
    )
    mlflow_min_interval_seconds: float = Field(
        default=0.1,
        ge=0,
        description="Embedded: a metric key gets a new MLflow point at most this often (0: every "
        "step); the apmon database keeps every step.",
    )
    mlflow_start_delay_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Embedded: the host starts its MLflow process this many seconds into the "
        "run, or when the run ends if that is sooner (0: at once). Its start (about 4 CPU-s of "
        "imports and store opening) slows training on the next core through memory traffic; "
        "a short run leaves it until after close(). Points wait for it; the apmon database and "
        "the alerts do not.",
    )
    mlflow_report: bool = Field(
        default=True,
        description="Embedded: render the run's report when it finishes and attach it to its "
        "MLflow run (the host process does it after the training job's close() returned).",
    )
    mlflow_close_waits: bool = Field(
        default=False,
        description="Embedded: close() waits until MLflow has the whole run. Off: close() returns "
        "once the apmon database has it and the host process finishes MLflow (metrics, report, "
        "run end) in the background at idle priority; Monitor.wait_for_mlflow() waits for it.",
    )
    project: str = Field(default="default", description="Project of embedded runs.")
    server_url: str | None = Field(
        default=None, description="apmon service URL; unset means embedded mode."
    )
    token: str | None = Field(default=None, description="API token for the apmon service.")
    plugins: list[str] | None = Field(
        default=None, description="Entry-point names of the plugins to load; unset loads all."
    )
    webhook_urls: list[str] = Field(default_factory=list, description="Alert webhooks.")
    alert_cooldown_steps: int = Field(default=50, ge=0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    spool_dir: str = Field(
        default=".apmon-spool", description="Where the client keeps undelivered batches."
    )
    # -- monitoring service and its HTTP client (issue 5) -------------------------------------
    mlflow_retry_max_seconds: float = Field(
        default=30.0, gt=0, description="Longest wait between MLflow retries in the service."
    )
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    token_cache_seconds: float = Field(
        default=10.0, ge=0, description="How long a worker trusts a checked token."
    )
    batch_max_records: int = Field(
        default=32, ge=1, description="Client: summaries and probes per ingest batch."
    )
    batch_max_seconds: float = Field(
        default=1.0, gt=0, description="Client: longest a record waits before its batch is sent."
    )
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    alert_wait_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Embedded: longest a step waits for the host to run the plugins over the "
        "previous step (then training stops waiting until the host catches up).",
    )
    embedded_buffer_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Embedded: most bytes of records kept for a host that stopped reading.",
    )
    host_store_fraction: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="Embedded: most of the wall time the host process spends storing results; "
        "beyond it, it stores every k-th step's site summaries and measures (every step's loss, "
        "run-level measures and alerts are kept; the detectors see every step). 0: store all.",
    )
    finish_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Client: how long finish waits for the service before leaving the spool.",
    )
    compiled_kernels: KernelPolicy = Field(
        default="auto",
        description="Client: when the training process loads apmon's compiled CPU kernels (numba; "
        "about 100 MiB of RSS once, 36 MiB of it private). 'auto': once they would have saved "
        "their price (1 s of loading, their memory valued at 4 s); 'always': in watch(); "
        "'never': count with numpy and torch "
        "(the same statistics, slower on the CPU).",
    )
    spool_memory_records: int = Field(
        default=10_000,
        ge=0,
        description="Client: records kept in memory while the spool directory cannot be "
        "written; beyond this the oldest are dropped (counted and reported).",
    )
