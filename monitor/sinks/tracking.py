"""Where an apmon run lands in MLflow: its experiment, and the standard tags of new runs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from monitor.schema import RunStart

DEFAULT_EXPERIMENT = "apmon"


def experiment_id(client: MlflowClient, configured: str = "") -> str:
    """The id of the experiment new runs go to, created when it is missing.

    In MLflow's own order: ``configured`` (``APMON_MLFLOW_EXPERIMENT``) when set, else
    ``MLFLOW_EXPERIMENT_NAME``, else ``MLFLOW_EXPERIMENT_ID`` (``mlflow.set_experiment`` in the
    training process sets it, and the host process inherits it), else ``apmon``.
    """
    name = configured or os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
    if not name:
        by_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "")
        if by_id and client.get_experiment(by_id) is not None:
            return by_id
        name = DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def standard_tags(start: RunStart) -> dict[str, str]:
    """MLflow's own tags for a run apmon creates: "Created by", "Source" and its type."""
    tags = {"mlflow.source.type": "LOCAL"}
    if start.user:
        tags["mlflow.user"] = start.user
    if start.source_name:
        tags["mlflow.source.name"] = start.source_name
    return tags
