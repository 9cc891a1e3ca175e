"""ActCoolLR's divergence, stored as an alert: the scheduler's ``actcool/diverged`` step scalar."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import AlertValue, StepSummary

# The names ``monitor.schedulers.actcool`` uses (the service side never imports the client).
DIVERGED_SCALAR = "actcool/diverged"
KIND = "actcool_divergence"


class ActCoolDivergenceDetector:
    """A critical alert at the step where ActCoolLR found its learning rate out of range.

    Source: thesis (Hartmann 2025) Appendix A.4 step 5: a learning rate above 1e10 or NaN from
    the transition model means a diverging run, and the scheduler stops it. The client raises
    ``ActCoolDivergence`` and records ``actcool/diverged = 1`` with ``Monitor.record_scalars``;
    this detector turns that scalar into a stored alert (and so an MLflow tag and a webhook).
    """

    name = "actcool_divergence"
    version = "1.0"
    requires: tuple[str, ...] = ()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """An alert for a StepSummary whose scalars say ActCoolLR diverged."""
        if not isinstance(event, StepSummary) or not event.scalars:
            return PluginResult()
        if event.scalars.get(DIVERGED_SCALAR, 0.0) < 1.0:
            return PluginResult()
        evidence: dict[str, object] = {
            k: v for k, v in event.scalars.items() if k.startswith("actcool/")
        }
        return PluginResult(
            alerts=[
                AlertValue(
                    kind=KIND,
                    step=event.step,
                    severity="critical",
                    message=(
                        "ActCoolLR's transition model asked for a learning rate above 1e10 "
                        "(or NaN): the training run is diverging and was stopped"
                    ),
                    evidence=evidence,
                )
            ]
        )
