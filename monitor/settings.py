"""All settings in one pydantic-settings class (environment prefix ``APMON_``), passed in, never global."""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_mlflow_uri() -> str:
    """The standard ``MLFLOW_TRACKING_URI`` when set, else a local SQLite store (no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


class Settings(BaseSettings):
    """Where results go and how the service behaves."""

    model_config = SettingsConfigDict(env_prefix="APMON_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///apmon.db",
        description="SQLAlchemy URL of the apmon database (SQLite file embedded, PostgreSQL in production).",
    )
    mlflow_tracking_uri: str = Field(
        default_factory=default_mlflow_uri,
        description="MLflow tracking URI; empty string disables the MLflow sink.",
    )
    mlflow_experiment: str = Field(default="apmon", description="MLflow experiment for new runs.")
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
