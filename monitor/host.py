"""The plugin host: runs every loaded plugin over a run's events in order and stores the results.

The same host runs in-process in embedded mode and inside the service's workers.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from monitor.measures import (
    Event,
    MeasurePlugin,
    PluginRegistry,
    PluginResult,
    RunContext,
    RunFinished,
)
from monitor.schema import AlertValue, ProbeRecord, StepSummary
from monitor.store.store import PluginOutcome, SqlStore

logger = logging.getLogger(__name__)

ResultListener = Callable[[str, int, PluginOutcome], None]


class PluginHost:
    """Feeds events to plugins and persists what they produce.

    ``listeners`` are called after each stored outcome (e.g. the MLflow sink, alert delivery);
    a listener that raises is logged and never interrupts ingestion.
    """

    def __init__(
        self,
        registry: PluginRegistry,
        store: SqlStore,
        listeners: Sequence[ResultListener] = (),
        alert_cooldown_steps: int = 50,
    ) -> None:
        self._plugins = registry.ordered()
        self._store = store
        self._listeners = list(listeners)
        self._cooldown = alert_cooldown_steps

    def handle_summary(self, run_id: str, summary: StepSummary) -> PluginOutcome:
        """Store a step summary and run the plugins on it."""
        self._store.save_summary(run_id, summary)
        return self._dispatch(run_id, summary.step, summary.source, summary)

    def handle_probe(self, run_id: str, probe: ProbeRecord) -> PluginOutcome:
        """Store a probe record and run the plugins on it."""
        self._store.save_probe(run_id, probe)
        return self._dispatch(run_id, probe.step, probe.kind, probe)

    def finish(self, run_id: str, final_step: int) -> PluginOutcome:
        """Run end-of-run work (e.g. Jaccard against the final measurement) and close the run."""

        def replay(source: str) -> Iterator[StepSummary]:
            return self._store.step_summaries(run_id, source)

        outcome = self._dispatch(run_id, final_step, "train", RunFinished(final_step, replay))
        self._store.finish_run(run_id)
        return outcome

    def _dispatch(self, run_id: str, step: int, source: str, event: Event) -> PluginOutcome:
        context = RunContext(run_id=run_id, sites=self._store.sites(run_id))
        states = self._store.plugin_states(run_id)
        outcome = run_plugins(self._plugins, event, context, states, step, source)
        outcome.alerts = [
            (plugin, alert)
            for plugin, alert in outcome.alerts
            if self._past_cooldown(run_id, alert, outcome)
        ]
        self._store.save_outcome(run_id, step, outcome)
        for listener in self._listeners:
            try:
                listener(run_id, step, outcome)
            except Exception:
                logger.exception("result listener %r failed at step %d", listener, step)
        return outcome

    def _past_cooldown(self, run_id: str, alert: AlertValue, outcome: PluginOutcome) -> bool:
        key = alert_key(alert)
        last = self._store.last_alert_step(run_id, key)
        return last is None or alert.step - last >= self._cooldown


def alert_key(alert: AlertValue) -> str:
    """The cool-down key of an alert: its kind and site (``*`` for run-level alerts)."""
    return f"{alert.kind}:{alert.site or '*'}"


def run_plugins(
    plugins: Sequence[MeasurePlugin],
    event: Event,
    context: RunContext,
    states: dict[str, dict[str, Any]],
    step: int,
    source: str,
) -> PluginOutcome:
    """Run every plugin over one event, in dependency order; touches no store.

    ``states`` holds each plugin's state and is updated in place; the outcome carries the new
    states of the plugins that ran. A plugin that raises is recorded in ``outcome.errors`` and
    skipped (its state is left as it was). Of several alerts with one cool-down key in this
    event only the first is kept; cool-downs against earlier events are the caller's.
    """
    outcome = PluginOutcome(source)
    upstream: dict[str, PluginResult] = {}
    for plugin in plugins:
        state: dict[str, Any] = dict(states.get(plugin.name, {}))
        try:
            result = plugin.process(event, context, state, upstream)
        except Exception as error:
            logger.warning("plugin %s failed at step %d: %s", plugin.name, step, error)
            outcome.errors.append((plugin.name, "".join(traceback.format_exception(error))))
            continue
        upstream[plugin.name] = result
        states[plugin.name] = state
        outcome.states[plugin.name] = state
        outcome.measures += [(plugin.name, plugin.version, m) for m in result.measures]
        outcome.fits += [(plugin.name, plugin.version, f) for f in result.fits]
        outcome.backfill += [
            (plugin.name, plugin.version, at, m)
            for at, measures in result.backfill.items()
            for m in measures
        ]
        for alert in result.alerts:
            if all(alert_key(alert) != alert_key(a) for _, a in outcome.alerts):
                outcome.alerts.append((plugin.name, alert))
    return outcome
