"""The trainers' own MLflow callbacks change process-wide state (``MLFLOW_EXPERIMENT_ID`` in the
environment, mlflow's tracking URI and active run): each test here leaves the process as it found
it, so later tests and the processes they start do not inherit another test's MLflow store."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def restore_mlflow_state() -> Iterator[None]:
    environment = dict(os.environ)
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # no override: the environment's store, restored below
    for key in set(os.environ) - set(environment):
        del os.environ[key]
    os.environ.update(environment)
