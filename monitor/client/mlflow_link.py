"""The training side's part in MLflow: the user's active run, who runs what, learning rates.

Nothing here imports mlflow (seconds of import): an active run is looked for only when the
training script has imported mlflow already.
"""

from __future__ import annotations

import getpass
import logging
import math
import sys
from typing import Any

from monitor.settings import Settings

logger = logging.getLogger(__name__)

MAX_LR_GROUPS = 16  # learning rates attached per step (scalars per step are bounded too)


def link_mlflow_run(settings: Settings, mlflow_run_id: str | None) -> tuple[Settings, str | None]:
    """The MLflow run to log into: ``mlflow_run_id``, else the active one, else None (new run).

    With an active run, apmon follows its tracking URI unless ``APMON_MLFLOW_TRACKING_URI`` (or
    an explicit setting) says otherwise, so the run id names a run of that store.
    """
    if mlflow_run_id is not None or not settings.mlflow_tracking_uri:
        return settings, mlflow_run_id
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return settings, None
    try:
        active = mlflow.active_run()
        if active is None:
            return settings, None
        run_id = str(active.info.run_id)
        uri = str(mlflow.get_tracking_uri())
    except Exception:
        logger.warning("apmon could not read the active MLflow run; it makes its own")
        return settings, None
    if "mlflow_tracking_uri" not in settings.model_fields_set and uri:
        settings = settings.model_copy(update={"mlflow_tracking_uri": uri})
    return settings, run_id


def run_origin() -> tuple[str | None, str]:
    """User and entry script, as MLflow would tag a run it started here."""
    try:
        user: str | None = getpass.getuser()
    except Exception:  # no user name in this environment (some containers)
        user = None
    script = sys.argv[0] if sys.argv else ""
    return user, script[:500] if script not in ("", "-c") else "python"


def learning_rates(optimizer: Any) -> dict[str, float]:
    """``lr/group<i>`` of each parameter group (at most ``MAX_LR_GROUPS``) that has a float lr."""
    rates: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups[:MAX_LR_GROUPS]):
        try:
            rate = float(group["lr"])  # a float, or a one-element tensor (some schedulers)
        except (KeyError, TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(rate):
            rates[f"lr/group{index}"] = rate
    return rates
