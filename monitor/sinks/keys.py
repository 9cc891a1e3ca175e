"""MLflow metric keys of measures: few and readable (``ap/<measure>/<site>``, ``apt/T_mean``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from monitor.schema import MeasureValue

if TYPE_CHECKING:
    from mlflow.entities import Param

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(measure: MeasureValue) -> str:
    """The MLflow key of a measure; characters MLflow refuses ('#' of site names) become ':'."""
    prefix = "ap" if measure.source in ("train", "probe_set") else "apt"
    source = "" if measure.source in ("train", "apt", "sweep") else f"{measure.source}/"
    key = f"{prefix}/{source}{measure.name}" + (f"/{measure.site}" if measure.site else "")
    return UNSAFE.sub(":", key)


def plugin_metric_key(plugin: str, measure: MeasureValue) -> str:
    """As ``metric_key``, but a client's own step scalars keep their names (``lr/group0``)."""
    if plugin == "scalars" and measure.site is None:
        return UNSAFE.sub(":", measure.name)
    return metric_key(measure)


def param(key: str, value: object) -> Param:
    """An MLflow param, its key made safe and both cut to MLflow's length limits."""
    from mlflow.entities import Param  # imported here: the service loads mlflow lazily

    return Param(UNSAFE.sub("_", key)[:250], str(value)[:6000])
